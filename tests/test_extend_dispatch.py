"""Which implementation runs an extend on CUDA: flash-attn's varlen kernel on the paged
cache where flash-attn is installed and takes the case, else our Triton kernel.

flash-attn is not installed on the CPU machines: these tests check the choice, the fallback
where flash-attn is missing or too old, and the arguments the launcher hands flash-attn,
through a stand-in written from flash-attn's documented semantics (varlen sequences, paged
keys through ``block_table``, the causal mask aligned to the bottom right), against the
reference op.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable: no Triton kernels to dispatch to")

from ttsearch.kernels import extend_attention  # noqa: E402
from ttsearch.kernels.compile_check import gpu_like  # noqa: E402
from ttsearch.ops import reference  # noqa: E402

calls: list[dict] = []


def flash_attn_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, block_table=None):
    """``flash_attn_varlen_func`` with a paged cache, as flash-attn documents it: sequence b's
    queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, its keys the first
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` tokens of its pages in ``block_table[b]``;
    query i of n sees keys up to ``seqlen_k - n + i`` (causal, bottom right); GQA by groups."""
    calls.append(dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal))
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == block_table.dtype == torch.int32
    page, group = k.shape[1], q.shape[1] // k.shape[2]
    out = torch.empty_like(q)
    for b in range(block_table.shape[0]):
        lo, hi = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        seqlen_k = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        assert hi - lo <= max_seqlen_q and seqlen_k <= max_seqlen_k
        pages = block_table[b, : math.ceil(seqlen_k / page)].long()
        keys, values = (c[pages].flatten(0, 1)[:seqlen_k].float().repeat_interleave(group, 1) for c in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), keys) * softmax_scale
        visible = torch.arange(seqlen_k)[None, :] <= (seqlen_k - (hi - lo) + torch.arange(hi - lo))[:, None]
        scores = scores.masked_fill(~visible, float("-inf")) if causal else scores
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


@pytest.fixture()
def flash_attn(monkeypatch):
    """flash-attn "installed": the stand-in as its varlen function."""
    calls.clear()
    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_stand_in
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    extend_attention.flash_attn_varlen.cache_clear()
    yield module
    extend_attention.flash_attn_varlen.cache_clear()


def case(on_gpu: bool, dtype: torch.dtype, block_size: int, head_dim: int = 64, tokens: int = 5):
    query = torch.zeros(tokens, 8, head_dim, dtype=dtype)
    k_cache = torch.zeros(2, block_size, 2, head_dim, dtype=dtype)
    return (gpu_like(query), gpu_like(k_cache)) if on_gpu else (query, k_cache)


@pytest.mark.parametrize("on_gpu,dtype,block_size,head_dim,tokens,expected", [
    (True, torch.bfloat16, 256, 64, 5, "flash-attn"),
    (True, torch.float16, 512, 128, 5, "flash-attn"),
    (True, torch.bfloat16, 16, 64, 5, "triton"),  # the engine's default blocks
    (True, torch.float32, 256, 64, 5, "triton"),  # flash-attn has no float32
    (True, torch.bfloat16, 256, 264, 5, "triton"),  # head_dim over 256
    (True, torch.bfloat16, 256, 64, 0, "triton"),  # nothing to extend
    (False, torch.bfloat16, 256, 64, 5, "triton"),  # CPU tensors: Triton's interpreter
])
def test_the_backend_each_case_takes(flash_attn, on_gpu, dtype, block_size, head_dim, tokens, expected):
    assert extend_attention.extend_backend(*case(on_gpu, dtype, block_size, head_dim, tokens)) == expected


@pytest.mark.parametrize("installed", [None, "without block_table"], ids=["missing", "too-old"])
def test_triton_when_flash_attn_is_missing_or_too_old(monkeypatch, installed):
    if installed is None:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    else:
        old = types.ModuleType("flash_attn")
        old.flash_attn_varlen_func = lambda q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: None
        monkeypatch.setitem(sys.modules, "flash_attn", old)
    extend_attention.flash_attn_varlen.cache_clear()
    try:
        assert extend_attention.extend_backend(*case(True, torch.bfloat16, 256)) == "triton"
    finally:
        extend_attention.flash_attn_varlen.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_attn_gets_the_extend_the_reference_computes(flash_attn, dtype):
    """A prefill, a single token and a chunk on a cache of 256-token pages (shuffled, the
    table padded with -1): the launcher's arguments make flash-attn compute the reference's
    extend, with bounds taken from host-side shapes."""
    gen = torch.Generator().manual_seed(0)
    block, ctx_lens, q_lens = 256, [300, 5, 520], [300, 1, 260]
    needed = [math.ceil(c / block) for c in ctx_lens]
    ids = torch.randperm(sum(needed), generator=gen)
    tables = torch.full((3, max(needed) + 1), -1, dtype=torch.int32)
    for b, start in enumerate(torch.tensor([0, *needed]).cumsum(0)[:-1].tolist()):
        tables[b, : needed[b]] = ids[start : start + needed[b]]
    k_cache, v_cache = (torch.randn(sum(needed), block, 2, 64, generator=gen).to(dtype) for _ in range(2))
    query = torch.randn(sum(q_lens), 8, 64, generator=gen).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int64)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    args = (query, k_cache, v_cache, tables, starts, lens)

    out = extend_attention.paged_extend_attention(*map(gpu_like, args), 0.125)

    clean = tables.clamp(min=0)
    expected = reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, 0.125)
    assert calls == [dict(max_seqlen_q=sum(q_lens), max_seqlen_k=tables.shape[1] * block, causal=True)]
    assert (out.float() - expected.float()).abs().max() <= {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
