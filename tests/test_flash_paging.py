"""The cache conversion behind bench_triton.py's flash-attn comparison, on the CPU.

``benchmarks/flash_paging.repage`` copies our 16-token-block cache into the 256-token pages
that flash-attn 2's paged decode requires. Checked here: every sequence reads the same tokens
through the new table, a shared prefix stays one copy, decode attention (the reference op)
gives the same output on both layouts, and the flash-attn call (through a stand-in written
from ``flash_attn_with_kvcache``'s documented arguments and checks) returns that output too.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import flash_paging  # noqa: E402

from ttsearch.ops import reference  # noqa: E402

BLOCK, KV_HEADS, HEADS, HEAD_DIM = 16, 3, 9, 64


def shared_prefix_cache(beams: int, prefix: int, own: int, dtype=torch.bfloat16, seed: int = 0):
    """``beams`` sequences behind one ``prefix``-token prefix, ``own`` tokens each after it, on
    shuffled blocks (as bench_triton.py builds them), plus spare blocks no table points at."""
    gen = torch.Generator().manual_seed(seed)
    shared, per_beam = prefix // BLOCK, -(-own // BLOCK)
    num_blocks = shared + beams * per_beam + 3
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.cat([ids[:shared].expand(beams, shared),
                        ids[shared: shared + beams * per_beam].view(beams, per_beam)], dim=1).to(torch.int32)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    lens = torch.full((beams,), prefix + own, dtype=torch.int32)
    return k_cache, v_cache, tables, lens


def tokens_of(cache, tables, lens):
    return [cache[tables[b].long()].flatten(0, 1)[: int(lens[b])] for b in range(tables.shape[0])]


@pytest.mark.parametrize("beams,prefix,own,page", [
    (8, 1024, 64, 256),  # the benchmark's shape, fewer beams: prefix on whole pages
    (5, 96, 40, 64),  # prefix ending inside a page, partial own blocks
    (3, 0, 33, 32),  # nothing shared
])
def test_repage_keeps_every_sequences_tokens(beams, prefix, own, page):
    k_cache, v_cache, tables, lens = shared_prefix_cache(beams, prefix, own)
    lens[0] -= 7  # one shorter sequence
    k_pages, v_pages, page_tables = flash_paging.repage(k_cache, v_cache, tables, page)
    assert k_pages.shape[1:] == (page, KV_HEADS, HEAD_DIM) and k_pages.dtype == k_cache.dtype
    assert page_tables.dtype == torch.int32 and page_tables.shape == (beams, -(-tables.shape[1] * BLOCK // page))
    for ours, theirs in ((k_cache, k_pages), (v_cache, v_pages)):
        for want, got in zip(tokens_of(ours, tables, lens), tokens_of(theirs, page_tables, lens)):
            assert torch.equal(want, got)


def test_a_prefix_on_whole_pages_is_stored_once():
    beams, prefix, own, page = 8, 1024, 64, 256
    k_cache, v_cache, tables, _ = shared_prefix_cache(beams, prefix, own)
    k_pages, _, page_tables = flash_paging.repage(k_cache, v_cache, tables, page)
    # the prefix's 4 pages, then one page per beam for its 64 tokens (192 of them unused)
    assert k_pages.shape[0] == prefix // page + beams
    assert (page_tables[:, : prefix // page] == page_tables[:1, : prefix // page]).all()
    assert page_tables[:, prefix // page].unique().numel() == beams


def test_repage_rejects_pages_that_split_blocks():
    k_cache, v_cache, tables, _ = shared_prefix_cache(2, 32, 16)
    for page in (0, 24, 8):
        with pytest.raises(ValueError, match="multiple of the block size"):
            flash_paging.repage(k_cache, v_cache, tables, page)


def test_decode_attention_is_the_same_on_both_layouts():
    k_cache, v_cache, tables, lens = shared_prefix_cache(6, 512, 48, dtype=torch.float32)
    lens[2] = 300  # ends inside the shared prefix
    query = torch.randn(6, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    k_pages, v_pages, page_tables = flash_paging.repage(k_cache, v_cache, tables, 256)
    want = reference.paged_decode_attention(query, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)
    got = reference.paged_decode_attention(query, k_pages, v_pages, page_tables, lens, HEAD_DIM**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def flash_attn_with_kvcache_stand_in(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                     cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                                     block_table=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                     return_softmax_lse=False):
    """flash-attn 2.8's paged decode as documented: q ``[batch, seqlen, heads, head_dim]``, caches
    ``[num_blocks, page_block_size, kv_heads, head_dim]`` with page_block_size a multiple of 256,
    int32 ``cache_seqlens`` and ``block_table``; the checks its C++ side makes, then the attention."""
    assert block_table is not None and block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (q.shape[0],)
    assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == q.shape[3] and q.shape[2] % k_cache.shape[2] == 0
    assert q.dim() == 4 and q.shape[1] == 1 and k is None and v is None
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = reference.paged_decode_attention(q[:, 0], k_cache, v_cache, block_table, cache_seqlens, scale)
    return out.unsqueeze(1)


@pytest.fixture()
def flash_attn(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = flash_attn_with_kvcache_stand_in
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return module


def test_flash_decode_hands_flash_attn_its_layout(flash_attn):
    k_cache, v_cache, tables, lens = shared_prefix_cache(4, 256, 64, dtype=torch.float32)
    query = torch.randn(4, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    pages = flash_paging.repage(k_cache, v_cache, tables, 256)
    got = flash_paging.flash_decode(query, *pages, lens, 0.1)
    want = reference.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.1)
    assert got.shape == query.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_flash_attn_or_one_without_paging(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert flash_paging.flash_attn_kvcache() is None
    old = types.ModuleType("flash_attn")
    old.flash_attn_with_kvcache = lambda q, k_cache, v_cache, k=None, v=None, cache_seqlens=None: None
    monkeypatch.setitem(sys.modules, "flash_attn", old)
    assert flash_paging.flash_attn_kvcache() is None
