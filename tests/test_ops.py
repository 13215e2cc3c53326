"""The KV-cache ops (store_kv, paged decode / extend attention, copy_blocks) x every
implementation, over many shapes and both dtypes.

The implementation under test is either ``reference`` (the pure-torch bodies in
``ttsearch.ops.reference``, checked against a float64 loop written here) or ``cpp`` (the
dispatched public op, served by ``ttsearch._C`` on the CPU, checked against the reference
bodies called directly). Data movement must be exact; attention within TOL.
"""

from __future__ import annotations

import math

import pytest
import torch

import ttsearch.ops as ops
from ttsearch.ops import reference

HAS_CPP = ops.IMPLEMENTATIONS["cpu"] == "cpp"
NO_CPP = "ttsearch._C is not built (or TTSEARCH_OPS=reference): no C++ kernels to compare"
IMPLS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason=NO_CPP))]
cpp_only = pytest.mark.skipif(not HAS_CPP, reason=NO_CPP)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
BLOCK = 16
HUGE = {torch.int32: 2**31 - 1, torch.int64: 2**40}

# ----------------------------------------------------------------------------- oracles
# Plain float64 loops, independent of the reference bodies.


def _context(cache, table_row, ctx):
    """[ctx, Hkv, D] float64: the sequence's first ctx cached tokens."""
    bs = cache.shape[1]
    ids = [int(table_row[i]) for i in range(math.ceil(ctx / bs))]
    return cache[ids].flatten(0, 1)[:ctx].double()


def _attend(q, keys, values, scale, visible):
    """q [n, H, D], keys/values [ctx, Hkv, D], visible [n, ctx] -> [n, H, D] (float64)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


def naive_decode(query, k_cache, v_cache, block_tables, context_lens, scale):
    out = torch.empty_like(query)
    for b, ctx in enumerate(context_lens.tolist()):
        keys, values = _context(k_cache, block_tables[b], ctx), _context(v_cache, block_tables[b], ctx)
        out[b] = _attend(query[b : b + 1], keys, values, scale, torch.ones(1, ctx, dtype=torch.bool))[0]
    return out


def naive_extend(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if lo == hi:
            continue
        keys, values = _context(k_cache, block_tables[b], ctx), _context(v_cache, block_tables[b], ctx)
        q_pos = torch.arange(ctx - (hi - lo), ctx)
        visible = torch.arange(ctx)[None, :] <= q_pos[:, None]
        out[lo:hi] = _attend(query[lo:hi], keys, values, scale, visible)
    return out


def naive_store_kv(key, value, k_cache, v_cache, slot_mapping):
    bs = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // bs, slot % bs] = key[t]
            v_cache[slot // bs, slot % bs] = value[t]


def naive_copy_blocks(kv_cache, src, dst):
    sources = [kv_cache[:, :, s].clone() for s in src.tolist()]
    for block, d in zip(sources, dst.tolist()):
        kv_cache[:, :, d] = block


ORACLES = {
    "paged_decode_attention": naive_decode,
    "paged_extend_attention": naive_extend,
    "store_kv": naive_store_kv,
    "copy_blocks": naive_copy_blocks,
}


def op_and_oracle(impl, name):
    if impl == "cpp":
        return getattr(ops, name), getattr(reference, name)
    return getattr(reference, name), ORACLES[name]


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert err <= TOL[actual.dtype], f"max abs error {err:.3g} > {TOL[actual.dtype]}"


# ----------------------------------------------------------------------------- paged inputs


def make_paged(ctx_lens, kv_heads, head_dim, dtype, index_dtype=torch.int32, seed=0, huge_inside=False):
    """Caches and block tables for sequences of ``ctx_lens`` tokens.

    Block ids are shuffled. Unused table entries hold -1 where a longer sequence in the
    batch uses that column and a huge id past it (everywhere with ``huge_inside``).
    Returns k_cache, v_cache, the raw tables, the same tables with garbage zeroed (for the
    oracles), and context_lens.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / BLOCK) for c in ctx_lens]
    num_blocks = sum(needed) + 3
    width = max(needed) + 2
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int64)
    clean = torch.zeros_like(tables)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = clean[b, :n] = ids[used : used + n]
        tables[b, n:] = HUGE[index_dtype] if huge_inside else -1
        tables[b, max(needed) :] = HUGE[index_dtype]
        used += n
    shape = (num_blocks, BLOCK, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    lens = torch.tensor(ctx_lens, dtype=index_dtype)
    return k_cache, v_cache, tables.to(index_dtype), clean.to(index_dtype), lens


def poison_unused(cache, clean_tables, ctx_lens):
    """A copy of ``cache`` with NaN in every slot no sequence's context covers."""
    covered = torch.zeros(cache.shape[0] * cache.shape[1], dtype=torch.bool)
    for b, ctx in enumerate(ctx_lens):
        for pos in range(ctx):
            covered[int(clean_tables[b, pos // BLOCK]) * BLOCK + pos % BLOCK] = True
    out = cache.clone()
    out.view(-1, *cache.shape[2:])[~covered] = float("nan")
    return out


def query_lens_for(ctx_lens):
    """New-token counts that mix full prefills, single tokens, chunks and empty sequences."""
    pattern = [lambda c: c, lambda c: 1, lambda c: (c + 1) // 2, lambda c: 0 if c > 1 else 1]
    return [pattern[i % len(pattern)](c) for i, c in enumerate(ctx_lens)]


# ----------------------------------------------------------------------------- attention cases

HEADS = {"gqa1": (2, 2), "gqa3": (9, 3), "gqa4": (8, 2), "gqa8": (8, 1)}
CONTEXTS = {
    "single": ([1], torch.int32),
    "boundary": ([15, 16, 17, 32, 33], torch.int32),
    "ragged": ([33, 1, 100, 16, 5, 64, 31], torch.int64),
    "long": ([700, 257], torch.int32),  # long enough to split a decode context
}


def attention_params():
    def case(dtype, head_dim, heads, ctx):
        return pytest.param(dtype, head_dim, heads, ctx, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}-{ctx}")

    for dtype in DTYPES:
        for head_dim in (64, 128):
            for heads in HEADS:
                for ctx in CONTEXTS:
                    yield case(dtype, head_dim, heads, ctx)
        for heads in ("gqa1", "gqa8"):  # a head dim the kernels do not specialize
            for ctx in ("boundary", "ragged"):
                yield case(dtype, 32, heads, ctx)


ATTENTION_PARAMS = list(attention_params())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,ctx", ATTENTION_PARAMS)
def test_paged_decode_attention(impl, dtype, head_dim, heads, ctx):
    num_heads, kv_heads = HEADS[heads]
    ctx_lens, index_dtype = CONTEXTS[ctx]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, head_dim, dtype, index_dtype)
    query = torch.randn(len(ctx_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    op, oracle = op_and_oracle(impl, "paged_decode_attention")
    k_before, v_before = k_cache.clone(), v_cache.clone()

    out = op(query, k_cache, v_cache, tables, lens, scale)

    assert_close(out, oracle(query, k_cache, v_cache, clean, lens, scale))
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,ctx", ATTENTION_PARAMS)
def test_paged_extend_attention(impl, dtype, head_dim, heads, ctx):
    num_heads, kv_heads = HEADS[heads]
    ctx_lens, index_dtype = CONTEXTS[ctx]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, head_dim, dtype, index_dtype)
    q_lens = query_lens_for(ctx_lens)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=index_dtype)
    query = torch.randn(sum(q_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    op, oracle = op_and_oracle(impl, "paged_extend_attention")

    out = op(query, k_cache, v_cache, tables, starts, lens, scale)

    assert_close(out, oracle(query, k_cache, v_cache, clean, starts, lens, scale))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_huge_ids_in_unused_entries_inside_batch(impl, op_name):
    """A short sequence's unused entries may hold any id, also in columns a longer one uses."""
    ctx_lens = [40, 3, 17]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 2, 64, torch.float32, huge_inside=True)
    op, oracle = op_and_oracle(impl, op_name)
    if op_name == "paged_decode_attention":
        query = torch.randn(3, 4, 64)
        args = (lens,)
    else:
        query = torch.randn(sum(ctx_lens), 4, 64)
        args = (torch.tensor([0, 40, 43, 60], dtype=torch.int32), lens)
    out = op(query, k_cache, v_cache, tables, *args, 0.125)
    assert_close(out, oracle(query, k_cache, v_cache, clean, *args, 0.125))


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_cpp_never_reads_past_a_context(dtype, op_name):
    """NaN in every slot outside the contexts must not reach the output."""
    ctx_lens = [15, 17, 1, 300, 33]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 3, 64, dtype, seed=1)
    k_poisoned, v_poisoned = poison_unused(k_cache, clean, ctx_lens), poison_unused(v_cache, clean, ctx_lens)
    if op_name == "paged_decode_attention":
        query = torch.randn(len(ctx_lens), 9, 64).to(dtype)
        args = (lens,)
    else:
        q_lens = query_lens_for(ctx_lens)
        query = torch.randn(sum(q_lens), 9, 64).to(dtype)
        args = (torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32), lens)
    out = getattr(ops, op_name)(query, k_poisoned, v_poisoned, tables, *args, 0.125)
    assert not out.isnan().any()
    assert_close(out, getattr(reference, op_name)(query, k_cache, v_cache, clean, *args, 0.125))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batches(impl):
    k_cache, v_cache, tables, _, lens = make_paged([5], 1, 32, torch.float32)
    decode, _ = op_and_oracle(impl, "paged_decode_attention")
    extend, _ = op_and_oracle(impl, "paged_extend_attention")
    out = decode(torch.randn(0, 2, 32), k_cache, v_cache, tables[:0], lens[:0], 0.2)
    assert out.shape == (0, 2, 32)
    out = extend(torch.randn(0, 2, 32), k_cache, v_cache, tables, torch.tensor([0, 0], dtype=torch.int32), lens, 0.2)
    assert out.shape == (0, 2, 32)


# ----------------------------------------------------------------------------- data movement


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,kv_heads,head_dim", [(1, 1, 64), (7, 3, 64), (64, 3, 64), (33, 2, 128)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv(impl, dtype, num_tokens, kv_heads, head_dim, slot_dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks = 2 * math.ceil(num_tokens / BLOCK) + 1
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * BLOCK, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding tokens
    slots = slots.to(slot_dtype)
    op, oracle = op_and_oracle(impl, "store_kv")
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    op(key, value, k_cache, v_cache, slots)

    oracle(key, value, k_expected, v_expected, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_store_kv_strided_and_converted_inputs(impl):
    """Keys sliced out of a fused QKV projection, and float32 values into a bfloat16 cache."""
    qkv = torch.randn(10, 5, 64)
    key, value = qkv[:, 3:4], qkv[:, 4:5].clone()
    k_cache = torch.zeros(4, BLOCK, 1, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 17, 63, 20, 21, 22, -1, 1])
    op, oracle = op_and_oracle(impl, "store_kv")
    k_expected, v_expected = k_cache.clone(), v_cache.clone()

    op(key, value, k_cache, v_cache, slots)

    oracle(key.to(torch.bfloat16), value.to(torch.bfloat16), k_expected, v_expected, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "layers,src,dst",
    [
        (1, [0], [5]),
        (3, [1, 2, 3, 7], [8, 9, 10, 11]),
        (2, [4, 4, 0], [1, 2, 3]),  # one source, several destinations
        (2, [1, 2, 5], [2, 3, 1]),  # destinations that are also sources
        (1, [], []),
    ],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_copy_blocks(impl, dtype, layers, src, dst, index_dtype):
    kv_cache = torch.randn(2, layers, 12, BLOCK, 3, 64).to(dtype)
    src_t, dst_t = torch.tensor(src, dtype=index_dtype), torch.tensor(dst, dtype=index_dtype)
    op, oracle = op_and_oracle(impl, "copy_blocks")
    expected = kv_cache.clone()

    op(kv_cache, src_t, dst_t)

    oracle(expected, src_t, dst_t)
    assert torch.equal(kv_cache, expected)


# ----------------------------------------------------------------------------- opcheck


def opcheck_cases():
    k_cache, v_cache, tables, _, lens = make_paged([5, 17], 2, 32, torch.float32)
    query = torch.randn(2, 4, 32)
    yield "paged_decode_attention", (query, k_cache, v_cache, tables, lens, 0.2)
    starts = torch.tensor([0, 5, 9], dtype=torch.int32)
    yield "paged_extend_attention", (torch.randn(9, 4, 32), k_cache, v_cache, tables, starts, lens, 0.2)
    key, value = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    yield "store_kv", (key, value, k_cache.clone(), v_cache.clone(), torch.tensor([3, -1, 40]))
    yield "copy_blocks", (torch.randn(2, 2, 6, BLOCK, 2, 32), torch.tensor([0, 1]), torch.tensor([4, 5]))


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.ttsearch, name).default, args)


# ----------------------------------------------------------------------------- validation


def test_cpp_serves_the_cpu():
    if not HAS_CPP:
        pytest.skip(NO_CPP)
    assert ops.IMPLEMENTATIONS["cpu"] == "cpp"


def test_bad_block_id_in_used_entry():
    k_cache, v_cache, tables, _, lens = make_paged([20, 5], 1, 32, torch.float32)
    tables[0, 1] = k_cache.shape[0]  # the second block of a 20-token context is used
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match="block id"):
        ops.paged_decode_attention(torch.randn(2, 1, 32), k_cache, v_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="block id"):
        ops.paged_extend_attention(torch.randn(2, 1, 32), k_cache, v_cache, tables,
                                   torch.tensor([0, 1, 2]), lens, 0.2)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


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


def test_mismatched_dtypes():
    k_cache, v_cache, tables, _, lens = make_paged([5], 1, 32, torch.float32)
    before = k_cache.clone(), v_cache.clone()
    query = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_extend_attention(query, k_cache, v_cache, tables, torch.tensor([0, 1]), lens, 0.2)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
