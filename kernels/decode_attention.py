"""paged_decode_attention: one new query token per sequence against its paged context.

One program per (sequence, kv head) takes all query heads of that kv head together as a
``[heads_per_group, D]`` tile, so each key/value of the context is read once per group
rather than once per query head (GQA). It walks the context in tiles of ``BLOCK_N`` tokens,
looking each token's block up in the sequence's block table, with an online softmax in
float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttsearch.kernels.attention_tile import attend_paged_tiles
from ttsearch.kernels.utils import dot_dtype

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(lens_ptr + seq)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    # Running max (log2 domain), denominator and unnormalised output per query head.
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, 0, context, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_tb, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_tn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE,
    )

    out = acc / l[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(query)
    batch, num_heads, head_dim = query.shape
    if batch == 0:
        return out
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    _paged_decode_kernel[(batch, kv_heads)](
        query, k_cache, v_cache, out, block_tables, context_lens,
        scale * _LOG2E,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_tables.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        # tl.dot needs every dimension >= 16 on a GPU: pad the group and head dims.
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=64,
        DOT_DTYPE=dot_dtype(query),
        num_warps=4,
    )
    return out
