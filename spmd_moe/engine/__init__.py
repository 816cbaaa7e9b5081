"""The layer loop and a run: the engine (stage passes, micro-batches, decode), the
runner (plan, start, time a run), the session it opens and the outputs it gathers.
"""
