"""store_kv and copy_blocks, every implementation (see ops_cases.py): exact against their
oracles; and the range errors of their checks.
"""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import BLOCK, COPY_BLOCKS_CASES, DTYPES, IMPLS, TRITON_IMPLS, device_of, launch, store_kv_inputs

CACHE_IMPLS = [*IMPLS, *TRITON_IMPLS]


@pytest.mark.parametrize("impl", CACHE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,kv_heads,head_dim", [(1, 1, 64), (7, 3, 64), (64, 3, 64), (33, 2, 128)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv(impl, dtype, num_tokens, kv_heads, head_dim, slot_dtype, monkeypatch):
    key, value, k_cache, v_cache, slots = store_kv_inputs(num_tokens, kv_heads, head_dim, dtype, slot_dtype)
    op, oracle = launch(impl, "store_kv", monkeypatch)
    device = device_of(impl)
    k_out, v_out = k_cache.to(device, copy=True), v_cache.to(device, copy=True)

    op(key.to(device), value.to(device), k_out, v_out, slots.to(device))

    oracle(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_out.cpu(), k_cache) and torch.equal(v_out.cpu(), v_cache)


@pytest.mark.parametrize("impl", CACHE_IMPLS)
def test_store_kv_strided_and_converted_inputs(impl, monkeypatch):
    """Keys sliced out of a fused QKV projection, and float32 values into a bfloat16 cache."""
    qkv = torch.randn(10, 5, 64)
    k_cache = torch.zeros(4, BLOCK, 1, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 17, 63, 20, 21, 22, -1, 1])
    op, oracle = launch(impl, "store_kv", monkeypatch)
    device = device_of(impl)
    qkv_out, k_out, v_out = (t.to(device, copy=True) for t in (qkv, k_cache, v_cache))

    op(qkv_out[:, 3:4], qkv_out[:, 4:5].clone(), k_out, v_out, slots.to(device))

    oracle(qkv[:, 3:4].to(torch.bfloat16), qkv[:, 4:5].to(torch.bfloat16), k_cache, v_cache, slots)
    assert torch.equal(k_out.cpu(), k_cache) and torch.equal(v_out.cpu(), v_cache)


@pytest.mark.parametrize("impl", CACHE_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,src,dst", COPY_BLOCKS_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_copy_blocks(impl, dtype, layers, src, dst, index_dtype, monkeypatch):
    kv_cache = torch.randn(2, layers, 12, BLOCK, 3, 64).to(dtype)
    src_t, dst_t = torch.tensor(src, dtype=index_dtype), torch.tensor(dst, dtype=index_dtype)
    op, oracle = launch(impl, "copy_blocks", monkeypatch)
    device = device_of(impl)
    out = kv_cache.to(device, copy=True)

    op(out, src_t.to(device), dst_t.to(device))

    oracle(kv_cache, src_t, dst_t)
    assert torch.equal(out.cpu(), kv_cache)



# ----------------------------------------------------------------------------- errors


def test_slot_past_the_pool():
    k_cache, v_cache = torch.randn(2, BLOCK, 1, 32), torch.randn(2, BLOCK, 1, 32)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match="slot out of range"):
        ops.store_kv(torch.randn(2, 1, 32), torch.randn(2, 1, 32), k_cache, v_cache, torch.tensor([0, 2 * BLOCK]))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_copy_blocks_bad_block_id():
    kv_cache = torch.randn(2, 1, 4, BLOCK, 1, 32)
    before = kv_cache.clone()
    with pytest.raises(ValueError, match="out of range"):
        ops.copy_blocks(kv_cache, torch.tensor([0, 1]), torch.tensor([2, 4]))
    assert torch.equal(kv_cache, before)
