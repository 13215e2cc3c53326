"""The online-softmax walk over a paged context that every attention kernel shares."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def row_tile(dtype: torch.dtype, group: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_N)`` for kernels that gather many query rows into one tile (the
    cascade prefix kernel, extend): 64 rows against 32 keys per step on the tensor cores
    keeps a 4-warp program within 128 registers on sm_90, so 4 fit on an SM (64 keys took
    up to 170). float32's exact (ieee) products run on the FMA units with their operands in
    registers: 32 x 32 does not spill (64 x 64 spilled up to 6.5 KB per thread).
    Rows are at least one GQA group, and at least 16 (tl.dot's minimum)."""
    rows = 32 if dtype == torch.float32 else 64
    return max(rows, triton.next_power_of_2(group)), 32


def decode_block_n(dtype: torch.dtype) -> int:
    """Keys per step of the decode kernels (a GQA group's query rows): 64 on the tensor
    cores; 16 (one block) for float32, whose exact products run on the FMA units (at 64 its
    double-buffered K/V tiles take 72 KiB of shared memory, and 32 took up to 166 registers
    on sm_90)."""
    return 16 if dtype == torch.float32 else 64


@triton.jit
def attend_paged_tiles(
    q, m, l, acc, lo, hi,
    k_cache_ptr, v_cache_ptr, table_ptr, kv_head, scale_log2,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tn,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, CAUSAL: tl.constexpr = False, q_pos=None,
):
    """Fold keys ``[lo, hi)`` of one paged sequence into the online softmax of ``q``'s rows.

    ``q`` is ``[R, BLOCK_D]`` in ``DOT_DTYPE``; ``m`` (running max, log2 domain), ``l``
    (denominator) and ``acc`` (unnormalised output, ``[R, BLOCK_D]``) are float32.
    ``table_ptr`` points at the sequence's block-table row, whose entries step by
    ``stride_tn``; ``kv_head`` selects the cache head. Scores are ``q . k * scale_log2``.
    With ``CAUSAL``, row ``r`` sees only keys at positions up to ``q_pos[r]``. Returns the
    updated ``(m, l, acc)``.
    """
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    # Each tile's block ids are read one tile ahead: its K/V addresses then wait on no load
    # of the same iteration, and Triton's pipeliner prefetches K/V into a second buffer
    # while this tile computes. Table entries past hi may hold anything: never dereference them.
    block = tl.load(table_ptr + ((lo + n) // BLOCK_SIZE) * stride_tn, mask=lo + n < hi, other=0)
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        valid = pos < hi
        ahead = pos + BLOCK_N
        next_block = tl.load(table_ptr + (ahead // BLOCK_SIZE) * stride_tn, mask=ahead < hi, other=0)
        block = block.to(tl.int64)
        offset = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
        k_rows = block * stride_kb + offset * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_rows[:, None] + d[None, :] * stride_kd, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * scale_log2
        if CAUSAL:
            s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        else:
            s = tl.where(valid[None, :], s, float("-inf"))
        # Finite: every row sees a key in the first tile (a valid token; key 0 when causal).
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)

        v_rows = block * stride_vb + offset * stride_vs + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_rows[:, None] + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # p is rounded to the cache dtype, as a bf16 attention multiplies it with V.
        pv = tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m = m_new
        block = next_block
    return m, l, acc
