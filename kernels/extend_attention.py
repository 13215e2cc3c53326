"""paged_extend_attention: several new tokens per sequence, causal among themselves,
against the sequence's paged context (which already holds their keys and values).

Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; new token ``i``
of ``n`` sits at position ``context_lens[b] - n + i`` and sees keys up to there. One
program per (tile of ``BLOCK_M`` new tokens of one sequence, kv head) takes the query heads
of that kv head for all its tokens as one ``[BLOCK_M x heads_per_kv, D]`` tile (rows in
``BLOCK_R``), so each key/value is read once per GQA group, flash-attention style: online
softmax in float32 over key tiles of ``BLOCK_N`` tokens looked up in the block table.

A sequence's tiles follow those of the sequences before it; each program finds its own
(sequence, tile) from ``query_start_loc``, so the host never reads it back (a sync per
layer). The grid covers the most tiles any split of the batch's tokens can take,
``ceil(tokens / BLOCK_M) + sequences - 1``: at most one idle program per sequence.

Where flash-attn is installed and takes the case (``extend_backend``), its varlen kernel
runs the extend on the paged cache instead, and this kernel is the fallback.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import triton
import triton.language as tl

from ttsearch.kernels.attention_tile import attend_paged_tiles, row_tile
from ttsearch.kernels.utils import dot_dtype

_LOG2E = 1.4426950408889634


@triton.jit
def _paged_extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, starts_ptr, lens_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tn,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    kv_head = tl.program_id(1)
    # This program's sequence: the first whose tiles, counted from the batch's start, pass
    # program_id(0); past the last tile there is no work.
    b = tl.arange(0, BLOCK_B)
    first_rows = tl.load(starts_ptr + b, mask=b < num_seqs, other=0)
    news = tl.load(starts_ptr + b + 1, mask=b < num_seqs, other=0) - first_rows
    tiles = (news + BLOCK_M - 1) // BLOCK_M
    tiles_to_end = tl.cumsum(tiles, 0)
    seq = tl.sum((tiles_to_end <= tl.program_id(0)).to(tl.int32), 0)
    if seq >= num_seqs:
        return
    tile = tl.program_id(0) - tl.sum(tl.where(b < seq, tiles, 0), 0)
    first_row = tl.load(starts_ptr + seq)
    num_new = tl.load(starts_ptr + seq + 1) - first_row
    context = tl.load(lens_ptr + seq)

    # Row r of the tile: query head r % GROUP (of this kv head) of new token r // GROUP.
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    i = tile * BLOCK_M + r // GROUP
    heads = kv_head * GROUP + r % GROUP
    rows_valid = (r < BLOCK_M * GROUP) & (i < num_new)
    q_mask = rows_valid[:, None] & (d < HEAD_DIM)[None, :]
    q_rows = (first_row + i).to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :] * stride_qd, mask=q_mask, other=0.0).to(DOT_DTYPE)
    q_pos = context - num_new + i

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # Keys past this tile's last query position are masked for all its rows: stop there.
    end = tl.minimum(context, context - num_new + (tile + 1) * BLOCK_M)
    # Causal: new token i sees keys up to its own position q_pos[i].
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, 0, end, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_tb, kv_head, scale_log2,
        stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_tn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE, CAUSAL=True, q_pos=q_pos,
    )

    out = acc / l[:, None]
    out_rows = (first_row + i).to(tl.int64) * stride_ot + heads * stride_oh
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
    if extend_backend(query, k_cache) == "flash-attn":
        return flash_attn_extend(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)
    return triton_extend(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale)


@functools.cache
def flash_attn_varlen() -> Callable | None:
    """flash-attn's ``flash_attn_varlen_func`` where it is installed and reads a paged cache
    (``block_table``, flash-attn 2.6 on), else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func if "block_table" in inspect.signature(flash_attn_varlen_func).parameters else None


#: flash-attn 2's paged KV takes only blocks of a multiple of this many tokens
FLASH_ATTN_PAGE_MULTIPLE = 256


def extend_backend(query: torch.Tensor, k_cache: torch.Tensor) -> str:
    """``"flash-attn"`` where flash-attn is installed and takes this extend, else ``"triton"``:
    CUDA tensors in bf16 or fp16 (flash-attn has no float32), head_dim a multiple of 8 up
    to 256, and cache blocks of a multiple of 256 tokens (flash-attn checks it; the engine's
    default of 16 keeps our kernel). Decided from the host-side shapes and dtypes alone."""
    head_dim, block_size = query.shape[-1], k_cache.shape[1]
    takes_it = (query.is_cuda and query.shape[0] > 0 and query.dtype in (torch.bfloat16, torch.float16)
                and head_dim % 8 == 0 and head_dim <= 256 and block_size % FLASH_ATTN_PAGE_MULTIPLE == 0)
    return "flash-attn" if takes_it and flash_attn_varlen() is not None else "triton"


def flash_attn_extend(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The extend through flash-attn's varlen kernel on the paged cache. Its causal mask is
    aligned to the bottom right (new token i of n sees keys up to context - n + i), ours. The
    longest query and context are bounded by host-side shapes (the batch's tokens, the
    table's width), so nothing is read back from the device."""
    cu_seqlens_k = torch.nn.functional.pad(context_lens.cumsum(0, dtype=torch.int32), (1, 0))
    return flash_attn_varlen()(
        query, k_cache, v_cache,
        cu_seqlens_q=query_start_loc.to(torch.int32), cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=query.shape[0], max_seqlen_k=block_tables.shape[1] * k_cache.shape[1],
        softmax_scale=scale, causal=True, block_table=block_tables.to(torch.int32),
    )


def triton_extend(
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
    num_seqs = context_lens.shape[0]
    if num_tokens == 0:
        return out
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    block_r, block_n = row_tile(query.dtype, group)
    block_m = block_r // group
    _paged_extend_kernel[(triton.cdiv(num_tokens, block_m) + num_seqs - 1, kv_heads)](
        query, k_cache, v_cache, out, block_tables, query_start_loc, context_lens,
        scale * _LOG2E, num_seqs,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_B=triton.next_power_of_2(num_seqs),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(query),
        num_warps=4,
    )
    return out

