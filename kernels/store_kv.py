"""store_kv: scatter new keys/values ``[T, Hkv, D]`` into the paged pools at their slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    BLOCK_SIZE: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: its whole [Hkv, D] row goes to one slot.
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64: block * stride can pass 2**31
    if slot < 0:  # a padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    k_dst = block * stride_kcb + offset * stride_kcs + h * stride_kch + d * stride_kcd
    v_dst = block * stride_vcb + offset * stride_vcs + h * stride_vch + d * stride_vcd
    tl.store(k_cache_ptr + k_dst, key, mask=mask)
    tl.store(v_cache_ptr + v_dst, value, mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    # A dtype change is torch's rounding (round to nearest even), the reference's exactly;
    # the kernel then only moves bits.
    key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_SIZE=block_size, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
