"""The command line: the parser and entry point (cli), the shared options, and one module
per command (bench, compare, generate, plan, plot, report).
"""
