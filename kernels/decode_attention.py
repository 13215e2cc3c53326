"""paged_decode_attention: one new query token per sequence against its paged context.

One program per (sequence, kv head, split) takes all query heads of that kv head together
as a ``[heads_per_group, D]`` tile, so each key/value of the context is read once per
group rather than once per query head (GQA). It walks its split's range of the context in
tiles of ``BLOCK_N`` tokens, looking each token's block up in the sequence's block table,
with an online softmax in float32. With one split (a batch that fills the GPU) it stores
the output; with more (few sequences, long contexts: see ``split_kv``) each split stores
a partial and a log-sum-exp, merged by a second small kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttsearch.kernels.attention_tile import attend_paged_tiles, decode_block_n
from ttsearch.kernels.split_kv import choose_splits, merge_splits, split_range, split_scratch, store_split
from ttsearch.kernels.utils import dot_dtype

_LOG2E = 1.4426950408889634


@triton.jit
def decode_prologue(
    q_ptr, seq, kv_head, stride_qb, stride_qh, stride_qd,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """The query heads of kv head ``kv_head`` of sequence ``seq`` as one ``[BLOCK_G, BLOCK_D]``
    tile in the dot dtype (padding rows and columns zero), and the online softmax's start:
    running max (log2 domain), denominator and unnormalised output per query head."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    return q, m, l, acc


@triton.jit
def decode_epilogue(
    out_ptr, part_out_ptr, part_lse_ptr, seq, kv_head, split, num_splits, num_heads, m, l, acc,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """A decode program's result for its query heads: with one split the output, normalised
    and in the output's dtype; with more, split ``split``'s partial and log-sum-exp in the
    ``[B, H, S]`` scratch, for ``split_kv.merge_splits``."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    if SPLIT:
        rows = (seq * num_heads + heads) * num_splits + split  # into the [B, H, S] scratch
        store_split(part_out_ptr, part_lse_ptr, rows, g < GROUP, m, l, acc, HEAD_DIM, BLOCK_D)
    else:
        out = acc / l[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :],
        )


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_heads,
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo, hi = 0, tl.load(lens_ptr + seq)
    if SPLIT:  # a constexpr: one split runs exactly the unsplit kernel
        lo, hi = split_range(lo, hi, BLOCK_N)

    q, m, l, acc = decode_prologue(q_ptr, seq, kv_head, stride_qb, stride_qh, stride_qd,
                                   GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, DOT_DTYPE)
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, lo, hi, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_tb, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_tn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE,
    )
    decode_epilogue(out_ptr, part_out_ptr, part_lse_ptr, seq, kv_head, tl.program_id(2), tl.num_programs(2), num_heads,
                    m, l, acc, stride_ob, stride_oh, stride_od, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, SPLIT)


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return paged_decode_attention_split(query, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_split(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``paged_decode_attention`` with each context split ``num_splits`` ways (None: the
    ``split_kv.choose_splits`` heuristic; a count forces it, for tests and benchmarks)."""
    out = torch.empty_like(query)
    batch, num_heads, head_dim = query.shape
    if batch == 0:
        return out
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    if num_splits is None:
        num_splits = choose_splits(batch * kv_heads, block_tables.shape[1] * block_size, query.device)
    part_out, part_lse = split_scratch(query, num_splits) if num_splits > 1 else (out, out)
    _paged_decode_kernel[(batch, kv_heads, num_splits)](
        query, k_cache, v_cache, out, block_tables, context_lens, part_out, part_lse,
        scale * _LOG2E, num_heads,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_tables.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        # tl.dot needs every dimension >= 16 on a GPU: pad the group and head dims.
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=decode_block_n(query.dtype),
        DOT_DTYPE=dot_dtype(query),
        SPLIT=num_splits > 1,
        num_warps=4,
    )
    if num_splits > 1:
        merge_splits(part_out, part_lse, out)
    return out
