"""paged_decode_attention and paged_extend_attention, every implementation (see ops_cases.py);
split-KV decode; and which backend a CUDA extend takes (flash-attn or our Triton kernel).

flash-attn is not installed on the CPU machines: the dispatch tests check the choice, the
fallback where flash-attn is missing or too old, and the arguments the launcher hands
flash-attn, through a stand-in written from flash-attn's documented semantics (varlen
sequences, paged keys through ``block_table``, the causal mask aligned to the bottom right),
against the reference op.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import (ATTENTION_CASES, ATTENTION_PARAMS, BLOCK, CONTEXTS, DTYPES, HEADS, IMPLS, LAUNCHERS, TOL,
                       assert_close, assert_within, cpp_only, decode_attention, device, extend_attention, gpu_like,
                       make_paged, needs_triton, on, op_and_oracle, poison_unused, query_lens_for, row_tile, split_kv,
                       triton)
from ttsearch.ops import reference


# ----------------------------------------------------------------------------- reference and C++


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,ctx", ATTENTION_PARAMS)
def test_paged_decode_attention(impl, dtype, head_dim, heads, ctx):
    num_heads, kv_heads = HEADS[heads]
    ctx_lens, index_dtype = CONTEXTS[ctx]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, head_dim, dtype, index_dtype)
    query = torch.randn(len(ctx_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    op, oracle = op_and_oracle(impl, "paged_decode_attention")
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out = op(query, k_cache, v_cache, tables, lens, scale)

    assert_close(out, oracle(query, k_cache, v_cache, clean, lens, scale))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,ctx", ATTENTION_PARAMS)
def test_paged_extend_attention(impl, dtype, head_dim, heads, ctx):
    num_heads, kv_heads = HEADS[heads]
    ctx_lens, index_dtype = CONTEXTS[ctx]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, head_dim, dtype, index_dtype)
    q_lens = query_lens_for(ctx_lens)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=index_dtype)
    query = torch.randn(sum(q_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    op, oracle = op_and_oracle(impl, "paged_extend_attention")

    out = op(query, k_cache, v_cache, tables, starts, lens, scale)

    assert_close(out, oracle(query, k_cache, v_cache, clean, starts, lens, scale))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_huge_ids_in_unused_entries_inside_batch(impl, op_name):
    """A short sequence's unused entries may hold any id, also in columns a longer one uses."""
    ctx_lens = [40, 3, 17]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 2, 64, torch.float32, huge_inside=True)
    op, oracle = op_and_oracle(impl, op_name)
    if op_name == "paged_decode_attention":
        query = torch.randn(3, 4, 64)
        args = (lens,)
    else:
        query = torch.randn(sum(ctx_lens), 4, 64)
        args = (torch.tensor([0, 40, 43, 60], dtype=torch.int32), lens)
    out = op(query, k_cache, v_cache, tables, *args, 0.125)
    assert_close(out, oracle(query, k_cache, v_cache, clean, *args, 0.125))


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_cpp_never_reads_past_a_context(dtype, op_name):
    """NaN in every slot outside the contexts must not reach the output."""
    ctx_lens = [15, 17, 1, 300, 33]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 3, 64, dtype, seed=1)
    k_poisoned, v_poisoned = poison_unused(k_cache, clean, ctx_lens), poison_unused(v_cache, clean, ctx_lens)
    if op_name == "paged_decode_attention":
        query = torch.randn(len(ctx_lens), 9, 64).to(dtype)
        args = (lens,)
    else:
        q_lens = query_lens_for(ctx_lens)
        query = torch.randn(sum(q_lens), 9, 64).to(dtype)
        args = (torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32), lens)
    out = getattr(ops, op_name)(query, k_poisoned, v_poisoned, tables, *args, 0.125)
    assert not out.isnan().any()
    assert_close(out, getattr(reference, op_name)(query, k_cache, v_cache, clean, *args, 0.125))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batches(impl):
    k_cache, v_cache, tables, _, lens = make_paged([5], 1, 32, torch.float32)
    decode, _ = op_and_oracle(impl, "paged_decode_attention")
    extend, _ = op_and_oracle(impl, "paged_extend_attention")
    out = decode(torch.randn(0, 2, 32), k_cache, v_cache, tables[:0], lens[:0], 0.2)
    assert out.shape == (0, 2, 32)
    out = extend(torch.randn(0, 2, 32), k_cache, v_cache, tables, torch.tensor([0, 0], dtype=torch.int32), lens, 0.2)
    assert out.shape == (0, 2, 32)


# ----------------------------------------------------------------------------- Triton

# A single-token context, block boundaries and +-1, ragged lengths; 100 spans several key tiles.
CONTEXT_LENS = [1, 15, 16, 17, 33, 100]


def extend_batch(ctx_lens, num_heads, head_dim, dtype, index_dtype, seed=1):
    """New tokens per sequence mixing full prefills, single tokens, chunks and none."""
    q_lens = query_lens_for(ctx_lens)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=index_dtype)
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    return query, starts


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_triton_paged_decode_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(CONTEXT_LENS, kv_heads, head_dim, dtype)
    query = torch.randn(len(CONTEXT_LENS), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    args = on(device, query, k_cache, v_cache, tables, lens)

    out = decode_attention.paged_decode_attention(*args, scale)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, scale)
    assert_within(out, expected, TOL[dtype])
    assert torch.equal(args[1].cpu(), k_cache) and torch.equal(args[2].cpu(), v_cache)


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_triton_paged_extend_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(CONTEXT_LENS, kv_heads, head_dim, dtype, torch.int64)
    query, starts = extend_batch(CONTEXT_LENS, num_heads, head_dim, dtype, torch.int64)
    scale = head_dim**-0.5

    out = extend_attention.paged_extend_attention(*on(device, query, k_cache, v_cache, tables, starts, lens), scale)

    expected = reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, scale)
    assert_within(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", ["gqa3", "gqa8"])
def test_triton_extend_tiles_fill_the_grid(device, dtype, heads):
    """Every sequence one token past a whole tile of new tokens: the batch needs exactly the
    ceil(tokens / BLOCK_M) + sequences - 1 programs the grid launches: one program short
    would leave the last tile's rows unwritten."""
    num_heads, kv_heads = HEADS[heads]
    group = num_heads // kv_heads
    block_m = row_tile(dtype, group)[0] // group
    q_lens = [block_m + 1] * 3
    ctx_lens = [q + extra for q, extra in zip(q_lens, (0, 20, 47))]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, 64, dtype, seed=4)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert sum(triton.cdiv(q, block_m) for q in q_lens) == triton.cdiv(sum(q_lens), block_m) + len(q_lens) - 1

    out = extend_attention.paged_extend_attention(*on(device, query, k_cache, v_cache, tables, starts, lens), 0.125)

    expected = reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, 0.125)
    assert_within(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_triton_attention_never_reads_past_a_context(device, dtype, op_name):
    """NaN in every slot outside the contexts must not reach the output."""
    ctx_lens = [15, 17, 1, 70, 33]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 3, 64, dtype, seed=2)
    k_poisoned, v_poisoned = poison_unused(k_cache, clean, ctx_lens), poison_unused(v_cache, clean, ctx_lens)
    if op_name == "paged_decode_attention":
        query = torch.randn(len(ctx_lens), 9, 64).to(dtype)
        extra = []
    else:
        query, starts = extend_batch(ctx_lens, 9, 64, dtype, torch.int32)
        extra = [starts]

    out = LAUNCHERS[op_name](*on(device, query, k_poisoned, v_poisoned, tables, *extra, lens), 0.125)

    expected = getattr(reference, op_name)(query, k_cache, v_cache, clean, *extra, lens, 0.125)
    assert_within(out, expected, TOL[dtype])


def test_triton_attention_on_strided_caches(device):
    """K and V pools as views of one [2, layers, ...] cache, a query sliced out of a wider tensor."""
    ctx_lens = [20, 3]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 2, 64, torch.float32, seed=3)
    kv_cache = torch.stack([torch.zeros_like(k_cache), k_cache, torch.zeros_like(k_cache), v_cache]).view(
        2, 2, *k_cache.shape
    )
    qkv = torch.randn(2, 8, 64)
    kv_cache, qkv, tables, lens = on(device, kv_cache, qkv, tables, lens)

    out = decode_attention.paged_decode_attention(qkv[:, :4], kv_cache[0, 1], kv_cache[1, 1], tables, lens, 0.125)

    expected = reference.paged_decode_attention(qkv[:, :4].cpu(), k_cache, v_cache, clean, lens.cpu(), 0.125)
    assert_within(out, expected, TOL[torch.float32])


def test_triton_attention_empty_batches(device):
    k_cache, v_cache, tables, _, lens = on(device, *make_paged([5], 1, 64, torch.float32))
    out = decode_attention.paged_decode_attention(torch.randn(0, 2, 64, device=device), k_cache, v_cache,
                                                  tables[:0], lens[:0], 0.2)
    assert out.shape == (0, 2, 64)
    starts = torch.tensor([0, 0], dtype=torch.int32, device=device)
    out = extend_attention.paged_extend_attention(torch.randn(0, 2, 64, device=device), k_cache, v_cache,
                                                  tables, starts, lens, 0.2)
    assert out.shape == (0, 2, 64)


# ----------------------------------------------------------------------------- split-KV decode


# 1 token, exactly one block, a partial last block, three key tiles of 64 (five of 32 in
# float32): with 5 splits the short contexts leave splits empty. Unused cache slots hold NaN throughout.
SPLIT_CONTEXT_LENS = [1, 16, 17, 150]


@pytest.mark.parametrize("splits,heads,dtype", [
    pytest.param(1, "gqa4", torch.float32, id="1-gqa4-float32"),
    pytest.param(2, "gqa4", torch.bfloat16, id="2-gqa4-bfloat16"),
    pytest.param(5, "gqa8", torch.float32, id="5-gqa8-float32"),
    pytest.param(5, "gqa1", torch.bfloat16, id="5-gqa1-bfloat16"),
])
def test_triton_decode_split_kv(device, splits, heads, dtype):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(SPLIT_CONTEXT_LENS, kv_heads, 64, dtype, seed=7)
    poisoned = [poison_unused(c, clean, SPLIT_CONTEXT_LENS) for c in (k_cache, v_cache)]
    query = torch.randn(len(SPLIT_CONTEXT_LENS), num_heads, 64).to(dtype)

    out = decode_attention.paged_decode_attention_split(*on(device, query, *poisoned, tables, lens), 0.125,
                                                        num_splits=splits)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125)
    assert_within(out, expected, TOL[dtype])


def test_triton_choose_splits(monkeypatch):
    cpu = torch.device("cpu")
    target = 2 * split_kv.sm_count(cpu)
    long = 1 << 20
    assert split_kv.choose_splits(target, long, cpu) == 1  # the grid fills the GPU: no merge
    assert split_kv.choose_splits(1, long, cpu) == target
    assert split_kv.choose_splits(3, long, cpu) == triton.cdiv(target, 3)
    assert split_kv.choose_splits(1, 3 * split_kv.MIN_SPLIT_TOKENS + 5, cpu) == 3  # splits stay long
    assert split_kv.choose_splits(1, split_kv.MIN_SPLIT_TOKENS - 1, cpu) == 1
    monkeypatch.setattr(split_kv, "INTERPRETER_SMS", 10_000)
    assert split_kv.choose_splits(1, long, cpu) == split_kv.MAX_SPLITS
    from ttsearch import batch_invariant

    monkeypatch.setattr(batch_invariant, "_enabled", True)  # no count chosen from the batch
    assert split_kv.choose_splits(1, long, cpu) == 1


def test_triton_decode_split_kv_by_default(device):
    """One long sequence alone splits by default (under the interpreter and on a GPU)."""
    k_cache, v_cache, tables, clean, lens = make_paged([600], 1, 64, torch.float32, seed=8)
    query = torch.randn(1, 2, 64)
    args = on(device, query, k_cache, v_cache, tables, lens)
    assert split_kv.choose_splits(1, tables.shape[1] * BLOCK, torch.device(device)) > 1

    out = decode_attention.paged_decode_attention(*args, 0.125)

    assert_within(out, reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125),
                 TOL[torch.float32])


# ----------------------------------------------------------------------------- the backend of a CUDA extend: flash-attn or Triton

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


@needs_triton
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


@needs_triton
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


@needs_triton
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
