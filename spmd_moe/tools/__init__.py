"""Tools run by bin/ scripts rather than by users: gpucheck (bin/gpu-check's stages).
"""
