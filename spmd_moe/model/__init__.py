"""The model: dense blocks (attention, norms, RoPE), the KV cache, weights (generated or
from a checkpoint), checkpoint families, the tokenizer, the input files, and the float64
reference of SPEC §1. Imports core and backend.
"""
