"""Every Triton kernel compiled for sm_80 and sm_90 on a machine without a GPU, through its
real launcher, and held to a budget (``ttsearch.kernels.compile_check`` does the compiling).

The launches are those of SmolLM2-135M (9 query / 3 KV heads) and Llama-3.2-1B (32 / 8),
head_dim 64, in bfloat16, float16 and float32: a prefill, short extends, decode with and
without split-KV, cascade decode with and without node splits, sampling, block copies and
the PRM readout. The budgets, per configuration and target:

- no register spills (ptxas's stack frame and local memory are 0);
- resident blocks per SM, from registers, warps and shared memory: every kernel at least
  2, so one program's loads overlap another's math; on sm_90 the kernels walking the paged
  cache at least 4 (16 warps streaming K/V; the cascade prefix kernel's 64-row tile must
  fit 4 at d64), and the elementwise ones at least 8 (they have no reuse to hide latency);
- shared memory within what one block may take on sm_80 (163 KiB);
- the kernels walking the paged cache keep at least 2 K/V buffers: the next tile loads while
  this one computes.

The compile runs in a fresh interpreter: the kernels must be imported with Triton's
interpreter off, which the other kernel tests turn on. Compiled kernels stay in Triton's
cache, so a second run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not importable: no Triton kernels to compile")

from ttsearch.kernels import compile_check  # noqa: E402  (imports no kernel)

ROOT = Path(__file__).resolve().parents[1]
PAGED_KERNELS = {"_paged_decode_kernel", "_suffix_kernel", "_prefix_kernel", "_paged_extend_kernel"}
ELEMENTWISE_KERNELS = {"_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel", "_store_kv_kernel",
                       "_copy_blocks_kernel", "_prm_step_score_kernel", "_merge_kernel"}
ALL_KERNELS = PAGED_KERNELS | ELEMENTWISE_KERNELS | {"_sample_kernel", "_quantized_linear_kernel"}


def min_blocks_per_sm(kernel: str, target: int) -> int:
    if kernel in ELEMENTWISE_KERNELS:
        return 8
    if kernel in PAGED_KERNELS and target == 90:
        return 4
    return 2


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "ttsearch.kernels.compile_check", "--json", str(out)], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_both_targets(compiled):
    configs = compiled["configurations"]
    for target in compile_check.TARGETS:
        assert {c["kernel"] for c in configs if c["target"] == target} == ALL_KERNELS
    for model in compile_check.MODELS:
        for dtype in ("bfloat16", "float16", "float32"):
            assert any(c["case"].startswith(f"{model.name} {dtype} ") for c in configs), (model.name, dtype)


def test_no_kernel_spills_and_each_fits_its_blocks_per_sm(compiled):
    over = [
        (c["kernel"], c["target"], c["case"], c["registers"], c["spill_bytes"], c["shared_bytes"], c["blocks_per_sm"])
        for c in compiled["configurations"]
        if c["spill_bytes"] or c["blocks_per_sm"] < min_blocks_per_sm(c["kernel"], c["target"])
        or c["shared_bytes"] > compile_check.LIMITS[80].shared_per_block
    ]
    assert not over, "kernel, target, case, registers, spill bytes, shared bytes, blocks/SM:\n" + "\n".join(
        map(str, over))


def test_paged_kernels_pipeline_their_loads(compiled):
    single = [(c["kernel"], c["target"], c["case"]) for c in compiled["configurations"]
              if c["kernel"] in PAGED_KERNELS and c["kv_buffers"] < 2]
    assert not single


def test_extend_launches_only_programs_with_work(compiled):
    """64 sequences appending 4 tokens each on the 1B shape: one program per (tile of a
    sequence's tokens, kv head), at most one idle one per sequence (a grid of sequences x
    heads x tiles of the whole batch launched 32,768 programs for 2,048 with work)."""
    llama = compile_check.MODELS[1]
    launches = [c for c in compiled["configurations"] if c["kernel"] == "_paged_extend_kernel"
                and c["case"].startswith(llama.name) and c["case"].endswith("extend 64x4")]
    assert launches
    for c in launches:
        working = 64 * -(-4 // c["constexprs"]["BLOCK_M"])  # tiles of the sequences' new tokens
        assert c["grid"][1] == llama.kv_heads and working <= c["grid"][0] <= working + 63, c["grid"]


def test_blocks_per_sm():
    # 4 warps of 128 threads: 128 registers fill an SM's 64K with 4 blocks, 129 round to 136
    assert compile_check.blocks_per_sm(90, 128, 4, 0) == 4
    assert compile_check.blocks_per_sm(90, 129, 4, 0) == 3
    assert compile_check.blocks_per_sm(90, 32, 4, 0) == 16  # 64 warps per SM
    assert compile_check.blocks_per_sm(90, 32, 1, 0) == 32  # 32 blocks per SM
    # 100 KiB of shared memory (plus the runtime's 1 KiB): 2 on sm_90's 228 KiB, 1 on sm_80's 164
    assert compile_check.blocks_per_sm(90, 32, 4, 100 << 10) == 2
    assert compile_check.blocks_per_sm(80, 32, 4, 100 << 10) == 1
