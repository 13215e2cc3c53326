"""copy_blocks: copy whole blocks ``src[i] -> dst[i]`` in every (K/V, layer) pool of the
cache ``[2, layers, num_blocks, block_size, kv_heads, head_dim]``, in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(
    src_cache_ptr, dst_cache_ptr, src_ids_ptr, dst_ids_ptr, overlap_ptr,
    stride_skv, stride_sl, stride_sb, stride_ss, stride_sh, stride_sd,
    stride_dkv, stride_dl, stride_db, stride_ds, stride_dh, stride_dd,
    LAYERS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_ELEMENTS: tl.constexpr, CHUNK: tl.constexpr, RUN_IF_OVERLAP: tl.constexpr,
):
    # Grid: (pair, K/V x layer, chunk of the block's block_size * kv_heads * head_dim elements).
    if (tl.load(overlap_ptr) != 0) != RUN_IF_OVERLAP:  # the other path copies
        return
    pair = tl.program_id(0)
    kv_layer = tl.program_id(1).to(tl.int64)  # int64: layer * layer stride can pass 2**31
    kv = kv_layer // LAYERS
    layer = kv_layer % LAYERS
    src = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ids_ptr + pair).to(tl.int64)

    e = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = e < BLOCK_ELEMENTS
    slot = e // (KV_HEADS * HEAD_DIM)
    head = (e // HEAD_DIM) % KV_HEADS
    dim = e % HEAD_DIM
    src_off = kv * stride_skv + layer * stride_sl + src * stride_sb
    src_off += slot * stride_ss + head * stride_sh + dim * stride_sd
    dst_off = kv * stride_dkv + layer * stride_dl + dst * stride_db
    dst_off += slot * stride_ds + head * stride_dh + dim * stride_dd
    tl.store(dst_cache_ptr + dst_off, tl.load(src_cache_ptr + src_off, mask=mask), mask=mask)


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    num_pairs = src.shape[0]
    if num_pairs == 0:
        return
    kv_pair, layers, _, block_size, kv_heads, head_dim = kv_cache.shape
    block_elements = block_size * kv_heads * head_dim
    chunk = min(4096, triton.next_power_of_2(block_elements))
    grid = (num_pairs, kv_pair * layers, triton.cdiv(block_elements, chunk))

    def launch(source, target, source_ids, target_ids, run_if_overlap):
        _copy_blocks_kernel[grid](
            source, target, source_ids, target_ids, overlap,
            *source.stride(), *target.stride(),
            LAYERS=layers, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
            BLOCK_ELEMENTS=block_elements, CHUNK=chunk, RUN_IF_OVERLAP=run_if_overlap,
        )

    # A destination that is also a source must be read before it is overwritten, and
    # programs run in no set order: then the sources go through a buffer first. Whether
    # they overlap stays on the device (reading it here would stall the host), so both
    # paths launch and the kernels themselves skip the one not taken.
    overlap = torch.isin(dst, src).any().to(torch.int32)
    staged = kv_cache.new_empty(kv_pair, layers, num_pairs, block_size, kv_heads, head_dim)
    order = torch.arange(num_pairs, device=src.device, dtype=src.dtype)
    launch(kv_cache, kv_cache, src, dst, False)
    launch(kv_cache, staged, src, order, True)
    launch(staged, kv_cache, order, dst, True)
