"""rotary_embedding: rotate-half (GPT-NeoX) RoPE in place on query and key, one program per
token. Each product is rounded to the dtype before the sum, as the reference's are."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, cos, sin, HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < HALF)
    first = x_ptr + h * (2 * HALF) + d
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (f1 * cos).to(x1.dtype).to(tl.float32) - (f2 * sin).to(x1.dtype).to(tl.float32)
    o2 = (f2 * cos).to(x1.dtype).to(tl.float32) + (f1 * sin).to(x1.dtype).to(tl.float32)
    tl.store(first, o1.to(x1.dtype), mask=mask)
    tl.store(first + HALF, o2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_kt,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    row = cache_ptr + pos * (2 * HALF)
    cos = tl.load(row + d, mask=d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate(q_ptr + t * stride_qt, cos, sin, Q_HEADS, HALF, BLOCK_QH, BLOCK_D)
    _rotate(k_ptr + t * stride_kt, cos, sin, K_HEADS, HALF, BLOCK_KH, BLOCK_D)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    tokens, q_heads, dim = query.shape
    if tokens == 0:
        return
    k_heads = key.shape[1]
    _rotary_kernel[(tokens,)](
        positions, query, key, cos_sin_cache, query.stride(0), key.stride(0),
        Q_HEADS=q_heads, K_HEADS=k_heads, HALF=dim // 2,
        BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_KH=triton.next_power_of_2(k_heads),
        BLOCK_D=triton.next_power_of_2(dim // 2),
    )
