"""The machine's ceiling for the policy's work: its own weight products at a given batch."""

from __future__ import annotations

import time

import torch


def model_gemm_flops(model, rows: int, passes: int = 8) -> float:
    """FLOP/s of ``model``'s weight products (every layer's and the LM head's) at ``rows``
    rows, through the model's own Linear: the best of ``passes`` passes (the first warms up;
    on a shared machine others may be disturbed)."""
    linears = [lin for layer in model.layers for lin in (layer["qkv"], layer["o"], layer["gate_up"], layer["down"])]
    linears.append(model.lm_head_linear)
    inputs = [torch.randn(rows, lin.in_features, dtype=model.dtype) for lin in linears]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(passes):
            start = time.perf_counter()
            for lin, x in zip(linears, inputs):
                lin(x)
            best = min(best, time.perf_counter() - start)
    return 2 * rows * sum(lin.in_features * lin.out_features for lin in linears) / best
