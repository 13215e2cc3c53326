"""Decode throughput on SmolLM2-135M against this machine's own matmul ceiling.

One run measures both, side by side:
- ``test_matmul_ceiling[dtype]``: the best FLOP/s of large square matmuls (1024..4096);
- ``test_decode[dtype-batch]``: one batched ``Engine.step`` of ``batch`` sequences with
  256-token contexts that share their first 255 tokens, as the beams of one problem share
  its prompt (so decode attention takes the shared-prefix path); tokens/s, and the
  fraction of the ceiling that the model's weight matmuls reach (matmul FLOPs per token x
  tokens/s / ceiling).

    python -m pytest benchmarks/bench_decode.py --benchmark-only \
        --benchmark-json benchmarks/results/decode_cpu.json
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from ttsearch import Engine

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CONTEXT = 256
ROUNDS = 12


@functools.cache
def matmul_ceiling(dtype_name: str) -> tuple[float, int]:
    """(best FLOP/s, the size that reached it) over square matmuls."""
    dtype = DTYPES[dtype_name]
    best = (0.0, 0)
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        runs = max(2, int(2e10 // (2 * n**3)))
        start = time.perf_counter()
        for _ in range(runs):
            torch.mm(a, b)
        flops = 2 * n**3 * runs / (time.perf_counter() - start)
        best = max(best, (flops, n))
    return best


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_matmul_ceiling(benchmark, dtype_name):
    flops, n = matmul_ceiling(dtype_name)
    a = torch.randn(n, n, dtype=DTYPES[dtype_name])
    benchmark.pedantic(torch.mm, args=(a, a), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        {"matrix_size": n, "ceiling_gflops": flops / 1e9, "gflops": 2 * n**3 / benchmark.stats["mean"] / 1e9}
    )


@functools.cache
def engine_for(dtype_name: str) -> Engine:
    return Engine("smollm2-135m", dtype=dtype_name, kv_cache_bytes=512 << 20, progress=False)


@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_decode(benchmark, dtype_name, batch):
    engine = engine_for(dtype_name)
    prompt = torch.randint(100, 40000, (CONTEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [engine.add(prompt[:-1] + [100 + i]) for i in range(batch)]  # distinct last tokens
    engine.step(seqs)
    benchmark.pedantic(engine.step, args=(seqs,), rounds=ROUNDS, warmup_rounds=2)
    tokens_per_s = batch / benchmark.stats["mean"]
    ceiling, _ = matmul_ceiling(dtype_name)
    achieved = engine.model.matmul_flops_per_token() * tokens_per_s
    benchmark.extra_info.update(
        {
            "batch": batch,
            "dtype": dtype_name,
            "context": CONTEXT,
            "tokens_per_s": tokens_per_s,
            "matmul_gflops": achieved / 1e9,
            "ceiling_gflops": ceiling / 1e9,
            "fraction_of_ceiling": achieved / ceiling,
        }
    )
    for seq in seqs:
        engine.free(seq)
