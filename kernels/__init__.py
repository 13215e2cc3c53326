"""Triton kernels for CUDA, installed as ``ttsearch.kernels``."""
