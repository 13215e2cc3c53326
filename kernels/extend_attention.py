"""paged_extend_attention: several new tokens per sequence, causal among themselves,
against the sequence's paged context (which already holds their keys and values).

Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; new token ``i``
of ``n`` sits at position ``context_lens[b] - n + i`` and sees keys up to there. One
program per (sequence, query head, tile of ``BLOCK_M`` new tokens), flash-attention style:
online softmax in float32 over key tiles of ``BLOCK_N`` tokens looked up in the block table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttsearch.kernels.attention_tile import attend_paged_tiles
from ttsearch.kernels.utils import dot_dtype

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, starts_ptr, lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    first_row = tl.load(starts_ptr + seq)
    num_new = tl.load(starts_ptr + seq + 1) - first_row
    if tile * BLOCK_M >= num_new:  # the grid covers the whole batch's new tokens
        return
    context = tl.load(lens_ptr + seq)
    kv_head = head // GROUP

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    q_mask = (i < num_new)[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = (first_row + i).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :] * stride_qd, mask=q_mask, other=0.0).to(DOT_DTYPE)
    q_pos = context - num_new + i

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys past this tile's last query position are masked for all its rows: stop there.
    end = tl.minimum(context, context - num_new + (tile + 1) * BLOCK_M)
    # Causal: new token i sees keys up to its own position q_pos[i].
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, 0, end, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_tb, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_tn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE, CAUSAL=True, q_pos=q_pos,
    )

    out = acc / l[:, None]
    out_rows = (first_row + i).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + out_rows[:, None] + d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_extend_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(query)
    num_tokens, num_heads, head_dim = query.shape
    if num_tokens == 0:
        return out
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    # No sequence has more new tokens than the batch: the grid covers that bound, so the
    # host never reads query_start_loc back (a sync per layer); idle tiles return at once.
    num_seqs = context_lens.shape[0]
    # Short chunks (decode-like steps, small appends) waste less of a 16-row tile.
    block_m = 16 if num_tokens <= 16 * num_seqs else 64
    grid = (num_seqs, num_heads, triton.cdiv(num_tokens, block_m))
    _paged_extend_kernel[grid](
        query, k_cache, v_cache, out, block_tables, query_start_loc, context_lens,
        scale * _LOG2E,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=64,
        DOT_DTYPE=dot_dtype(query),
        num_warps=4,
    )
    return out
