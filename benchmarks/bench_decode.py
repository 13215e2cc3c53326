"""Decode throughput on SmolLM2-135M against this machine's own matmul ceiling.

One run measures both, side by side:
- ``test_matmul_ceiling[dtype]``: the best FLOP/s of large square matmuls (1024..4096,
  through ``torch.mm`` and ``F.linear``);
- ``test_decode[dtype-batch]``: one batched ``Engine.step`` of ``batch`` sequences with
  256-token contexts that share their first 255 tokens, as the beams of one problem share
  its prompt (so decode attention takes the shared-prefix path); tokens/s, and the
  fraction of two ceilings that the model's weight matmuls reach (matmul FLOPs per token
  x tokens/s / ceiling): the square matmuls' above, and the model's own products at this
  batch (M = batch, each layer's K and N and the LM head's, run back to back through the
  model's Linear: what the matmuls alone allow a decode step of this batch);
- ``test_decode_batch_invariant[dtype]``: the same at batch 64 in batch-invariant mode,
  to set beside ``test_decode[dtype-64]``: what the mode costs.

    python -m pytest benchmarks/bench_decode.py --benchmark-only \
        --benchmark-json benchmarks/results/decode_cpu_<machine>.json
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.nn.functional as F

from ceilings import model_gemm_flops
from ttsearch import Engine, batch_invariant

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CONTEXT = 256
ROUNDS = 12


# torch.mm and F.linear reach the BLAS by different paths: on a CPU without native bf16,
# ``mm`` falls back to a slow generic loop where ``linear`` (the model's call) does not
MATMULS = {"mm": torch.mm, "linear": F.linear}


@functools.cache
def matmul_ceiling(dtype_name: str) -> tuple[float, int, str]:
    """(best FLOP/s, the size and the call that reached it) over square matmuls."""
    dtype = DTYPES[dtype_name]
    best = (0.0, 0, "")
    for name, matmul in MATMULS.items():
        for n in (1024, 2048, 4096):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            start = time.perf_counter()
            matmul(a, b)  # warms up, and tells how many runs fill about a second
            first = time.perf_counter() - start
            runs = max(2, int(1.0 / first))
            start = time.perf_counter()
            for _ in range(runs):
                matmul(a, b)
            best = max(best, (2 * n**3 * runs / (time.perf_counter() - start), n, name))
            if first > 1.0:  # a slow path: a larger size would take minutes
                break
    return best


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_matmul_ceiling(benchmark, dtype_name):
    flops, n, name = matmul_ceiling(dtype_name)
    a = torch.randn(n, n, dtype=DTYPES[dtype_name])
    benchmark.pedantic(MATMULS[name], args=(a, a), rounds=3, warmup_rounds=0)
    benchmark.extra_info.update({"matrix_size": n, "call": name, "ceiling_gflops": flops / 1e9,
                                 "gflops": 2 * n**3 / benchmark.stats["mean"] / 1e9})


@functools.cache
def model_shape_ceiling(dtype_name: str, rows: int) -> float:
    """FLOP/s of the policy's own weight products at ``rows`` rows (ceilings.py)."""
    return model_gemm_flops(engine_for(dtype_name).model, rows)


@functools.cache
def engine_for(dtype_name: str) -> Engine:
    return Engine("smollm2-135m", dtype=dtype_name, kv_cache_bytes=512 << 20, progress=False)


def time_decode_step(benchmark, engine: Engine, batch: int, rounds: int = ROUNDS) -> None:
    """pytest-benchmark's timing of one ``engine.step`` of ``batch`` sequences with CONTEXT-token
    contexts that share all but their last token."""
    prompt = torch.randint(100, 40000, (CONTEXT,), generator=torch.Generator().manual_seed(0)).tolist()
    seqs = [engine.add(prompt[:-1] + [100 + i]) for i in range(batch)]  # distinct last tokens
    engine.step(seqs)
    benchmark.pedantic(engine.step, args=(seqs,), rounds=rounds, warmup_rounds=2)
    for seq in seqs:
        engine.free(seq)


def measure_decode(benchmark, dtype_name: str, batch: int) -> dict:
    engine = engine_for(dtype_name)
    time_decode_step(benchmark, engine, batch)
    tokens_per_s = batch / benchmark.stats["mean"]
    ceiling, _, _ = matmul_ceiling(dtype_name)
    at_shapes = model_shape_ceiling(dtype_name, batch)
    achieved = engine.model.matmul_flops_per_token() * tokens_per_s
    return {
        "batch": batch,
        "dtype": dtype_name,
        "context": CONTEXT,
        "tokens_per_s": tokens_per_s,
        "matmul_gflops": achieved / 1e9,
        "ceiling_gflops": ceiling / 1e9,
        "fraction_of_ceiling": achieved / ceiling,
        "model_shape_ceiling_gflops": at_shapes / 1e9,
        "fraction_of_model_shape_ceiling": achieved / at_shapes,
    }


@pytest.mark.parametrize("batch", [1, 16, 64, 256])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_decode(benchmark, dtype_name, batch):
    benchmark.extra_info.update(measure_decode(benchmark, dtype_name, batch))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_decode_batch_invariant(benchmark, dtype_name):
    batch_invariant.set_enabled(True)
    try:
        info = measure_decode(benchmark, dtype_name, 64)
    finally:
        batch_invariant.set_enabled(False)
    benchmark.extra_info.update({**info, "batch_invariant": True})
