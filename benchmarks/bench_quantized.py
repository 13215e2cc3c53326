"""Decode throughput on SmolLM2-135M's Q4_1 GGUF file with its weights packed (kept in their
quantized blocks, multiplied by ``quantized_linear``) against the same file dequantized to
bf16 at load, side by side in one run:

- ``test_stream_bandwidth``: this machine's streaming read bandwidth (a sum over a 1 GiB
  float32 buffer, every core);
- ``test_decode[batch-weights]``: one batched ``Engine.step`` of ``batch`` sequences with
  256-token contexts (as bench_decode.py), in the machine's default dtype (bf16 where the CPU
  multiplies it in hardware, else float32; ``BENCH_DTYPE`` picks another); tokens/s, the
  bytes of weights one step reads (every matrix once, whatever the batch) and their rate as a
  fraction of the streaming bandwidth.

    python -m pytest benchmarks/bench_quantized.py --benchmark-only \\
        --benchmark-json benchmarks/results/quantized_cpu_<machine>.json
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from bench_decode import CONTEXT, time_decode_step
from ttsearch import Engine

ROUNDS = 8
WEIGHTS = ("dequantized", "packed")


@functools.cache
def stream_bandwidth() -> float:
    """Bytes/s of the best of a few full reads of 1 GiB, far past any cache."""
    buffer = torch.ones(1 << 28)  # float32
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = max(best, buffer.numel() * 4 / (time.perf_counter() - start))
    return best


def test_stream_bandwidth(benchmark):
    buffer = torch.ones(1 << 28)
    benchmark.pedantic(buffer.sum, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"bytes": buffer.numel() * 4, "best_gb_per_s": stream_bandwidth() / 1e9})


@functools.cache
def engine_for(weights: str) -> Engine:
    return Engine("smollm2-135m", dtype=os.environ.get("BENCH_DTYPE"), weights=weights, kv_cache_bytes=768 << 20,
                  progress=False)


# the two weights of a batch size run back to back: a ratio is read from neighbouring timings
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("batch", [1, 4, 8, 16, 64, 256])
def test_decode(benchmark, weights, batch):
    engine = engine_for(weights)
    time_decode_step(benchmark, engine, batch, rounds=ROUNDS)
    step = benchmark.stats["mean"]
    weight_bytes = engine.model.weight_bytes
    benchmark.extra_info.update({
        "weights": weights,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "batch": batch,
        "context": CONTEXT,
        "tokens_per_s": batch / step,
        "weight_bytes_per_step": weight_bytes,
        "fraction_of_stream_bandwidth": weight_bytes / step / stream_bandwidth(),
    })
