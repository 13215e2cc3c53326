"""Every op (store_kv, paged decode / extend attention, cascade decode attention,
copy_blocks, prm_step_score) x every implementation, over many shapes and both dtypes.

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
from ttsearch.aggregation import AGGREGATIONS
from ttsearch.ops import checks, reference

HAS_CPP = ops.IMPLEMENTATIONS["cpu"].startswith("cpp")  # "cpp-<isa level>"
NO_CPP = "ttsearch._C is not built (or TTSEARCH_OPS=reference): no C++ kernels to compare"
IMPLS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason=NO_CPP))]
cpp_only = pytest.mark.skipif(not HAS_CPP, reason=NO_CPP)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
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


# ----------------------------------------------------------------------------- cascade decode attention


def make_cascade(groups, ungrouped, kv_heads, head_dim, dtype, block=BLOCK, index_dtype=torch.int32, seed=0,
                 levels=None, one_level=False):
    """A batch whose sequences share prefixes along a tree, mixed with sequences in no node.

    ``groups``: the root nodes, each ``(prefix_blocks, members)``; a member is either a
    sequence's own token count past the node (0: its context ends with the node) or a child
    node of the same form. ``ungrouped``: context lengths of sequences in no node.
    Sequences are interleaved in a fixed shuffled order and block ids are shuffled; so are
    node ids in a tree deeper than one level. Table entries past a context, and
    prefix-table entries past a prefix, hold -1 or a huge id.

    ``seq_group`` is 1-D for a one-level tree, else ``[B, levels]`` (by default the depth)
    with -1 padding. ``one_level`` flattens any tree to one level instead: a sequence's
    group is its whole path as one prefix, shared by the sequences on the same path (the
    same caches and tables). Returns a dict of the op's arguments (minus query and scale),
    ``clean`` tables for the oracles, and ``ctx_lens``.
    """
    gen = torch.Generator().manual_seed(seed)
    node_blocks, seqs = [], []  # seqs: (path as node indices, context length)

    def visit(node, path):
        blocks, members = node
        path = path + [len(node_blocks)]
        node_blocks.append(blocks)
        for member in members:
            if isinstance(member, tuple):
                visit(member, path)
            else:
                seqs.append((path, sum(node_blocks[n] for n in path) * block + member))

    for root in groups:
        visit(root, [])
    seqs += [([], ctx) for ctx in ungrouped]
    seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=gen).tolist()]
    needed = [math.ceil(ctx / block) for _, ctx in seqs]
    own = [n - sum(node_blocks[g] for g in path) for (path, _), n in zip(seqs, needed)]
    num_blocks = sum(node_blocks) + sum(own) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    prefixes = [[ids.pop() for _ in range(nb)] for nb in node_blocks]

    width = max(needed) + 2
    tables = torch.full((len(seqs), width), -1, dtype=torch.int64)
    clean = torch.zeros_like(tables)
    for b, ((path, _), n) in enumerate(zip(seqs, needed)):
        row = [i for g in path for i in prefixes[g]] + [ids.pop() for _ in range(own[b])]
        tables[b, :n] = clean[b, :n] = torch.tensor(row, dtype=torch.int64)
        tables[b, max(needed):] = HUGE[index_dtype]
    shape = (num_blocks, block, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)

    depth = max((len(path) for path, _ in seqs), default=0)
    if one_level:  # one group per distinct path, holding all of its blocks
        paths = list(dict.fromkeys(tuple(path) for path, _ in seqs if path))
        prefixes = [[i for g in path for i in prefixes[g]] for path in paths]
        rows = [[paths.index(tuple(path))] if path else [-1] for path, _ in seqs]
    else:
        rows = [path + [-1] * ((levels or max(depth, 1)) - len(path)) for path, _ in seqs]
        if depth > 1:  # node ids in no particular order along a path
            rename = torch.randperm(len(prefixes), generator=gen).tolist()
            rows = [[rename[g] if g >= 0 else -1 for g in row] for row in rows]
            prefixes = [prefixes[rename.index(g)] for g in range(len(prefixes))]
    seq_group = torch.tensor(rows, dtype=torch.int64).view(len(seqs), -1)
    if one_level or (depth <= 1 and levels is None):
        seq_group = seq_group[:, 0]
    prefix_tables = torch.full((len(prefixes), max(map(len, prefixes), default=0) + 1), HUGE[index_dtype],
                               dtype=torch.int64)
    for g, blocks in enumerate(prefixes):
        prefix_tables[g, : len(blocks)] = torch.tensor(blocks, dtype=torch.int64)
        prefix_tables[g, len(blocks)] = -1

    args = dict(
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables.to(index_dtype),
        context_lens=torch.tensor([ctx for _, ctx in seqs], dtype=index_dtype),
        prefix_tables=prefix_tables.to(index_dtype),
        prefix_lens=torch.tensor(list(map(len, prefixes)), dtype=index_dtype) * block,
        seq_group=seq_group.to(index_dtype),
    )
    return args, clean.to(index_dtype), [ctx for _, ctx in seqs]


def cascade_args(args, query, scale):
    return (query, args["k_cache"], args["v_cache"], args["block_tables"], args["context_lens"],
            args["prefix_tables"], args["prefix_lens"], args["seq_group"], scale)


SUFFIXES = [1, 15, 16, 17]
CASCADES = {
    # 64 sequences sharing one block; suffixes at a block boundary and +-1
    "group64-prefix1": ([(1, SUFFIXES * 16)], []),
    # groups of 1, 2, 5 and 17 (a long prefix: split into chunks), an empty group, 3 ungrouped
    "mixed": ([(3, [16]), (2, [1, 17]), (1, [15, 16, 17, 1, 0]), (40, (SUFFIXES * 5)[:17]), (2, [])],
              [1, 33, 300]),
    # 8 sequences behind a 1024-token prefix, contexts of the prefix alone up to +17
    "group8-prefix64": ([(64, [0, 1, 15, 16, 17, 2, 31, 33])], [17]),
}


def cascade_params():
    for dtype in DTYPES:
        for head_dim in (64, 128):
            for heads in HEADS:
                for case in CASCADES:
                    yield pytest.param(dtype, head_dim, heads, case, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}-{case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,case", list(cascade_params()))
def test_cascade_decode_attention(impl, dtype, head_dim, heads, case):
    num_heads, kv_heads = HEADS[heads]
    groups, ungrouped = CASCADES[case]
    args, clean, _ = make_cascade(groups, ungrouped, kv_heads, head_dim, dtype,
                                  index_dtype=torch.int64 if case == "mixed" else torch.int32)
    query = torch.randn(len(args["context_lens"]), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    plain = (query, args["k_cache"], args["v_cache"], clean, args["context_lens"], scale)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()

    if impl == "cpp":
        out = ops.cascade_decode_attention(*cascade_args(args, query, scale))
        assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, scale)))
        assert_close(out, reference.paged_decode_attention(*plain))
        assert_close(out, ops.paged_decode_attention(*plain))
    else:
        out = reference.cascade_decode_attention(*cascade_args(args, query, scale))
        assert_close(out, naive_decode(*plain))
    # The same groups as paths of one level: seq_group [B, 1]
    one_column = dict(args, seq_group=args["seq_group"][:, None])
    assert_close((ops if impl == "cpp" else reference).cascade_decode_attention(*cascade_args(one_column, query, scale)),
                 out)
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("members", [1, 2, 3, 4, 7, 16, 33, 64])
def test_cascade_group_sizes(impl, dtype, members):
    """One group of 1..64 sequences (either side of every size the C++ path treats apart)
    with a prefix long enough to be split, and an ungrouped sequence."""
    args, clean, _ = make_cascade([(20, (SUFFIXES * 16)[:members])], [40], 3, 64, dtype, seed=members)
    query = torch.randn(members + 1, 9, 64).to(dtype)
    op, _ = op_and_oracle(impl, "paged_decode_attention")
    out = (ops if impl == "cpp" else reference).cascade_decode_attention(*cascade_args(args, query, 0.125))
    assert_close(out, op(query, args["k_cache"], args["v_cache"], clean, args["context_lens"], 0.125))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@pytest.mark.parametrize("block", [5, 8])
def test_cascade_other_block_sizes(impl, dtype, block):
    """An odd block size: the bf16 path pairs consecutive keys, across blocks and with a pad.
    (float16 takes the C++ float32 path.)"""
    args, clean, _ = make_cascade([(3, [1, 4, 5, 6]), (9, [0, 2, 7])], [11], 2, 64, dtype, block=block)
    query = torch.randn(8, 8, 64).to(dtype)
    out = (ops if impl == "cpp" else reference).cascade_decode_attention(*cascade_args(args, query, 0.125))
    assert_close(out, naive_decode(query, args["k_cache"], args["v_cache"], clean, args["context_lens"], 0.125))


# One level, and a tree with an unused node, for the poisoned-cache tests.
POISON_CASES = {
    "one-level": ([(5, [1, 17, 16, 0, 3]), (1, [15, 1])], [300, 2]),
    "tree": ([(2, [(1, [0, 17, (1, [16, 1])]), (3, [15, 0]), (1, [])]), (1, [1])], [300, 2]),
}


@cpp_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POISON_CASES)
def test_cascade_cpp_never_reads_past_a_context(dtype, case):
    """NaN in every slot outside the contexts (the blocks of a node no sequence holds too)
    must not reach the output."""
    args, clean, ctx_lens = make_cascade(*POISON_CASES[case], 3, 64, dtype, seed=3)
    query = torch.randn(len(ctx_lens), 9, 64).to(dtype)
    poisoned = dict(args, k_cache=poison_unused(args["k_cache"], clean, ctx_lens),
                    v_cache=poison_unused(args["v_cache"], clean, ctx_lens))
    out = ops.cascade_decode_attention(*cascade_args(poisoned, query, 0.125))
    assert not out.isnan().any()
    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)))


@pytest.mark.parametrize("impl", IMPLS)
def test_cascade_without_groups_and_empty(impl):
    op = ops.cascade_decode_attention if impl == "cpp" else reference.cascade_decode_attention
    k_cache, v_cache, tables, clean, lens = make_paged([33, 1, 17], 3, 64, torch.float32)
    query = torch.randn(3, 9, 64)
    no_groups = (torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    out = op(query, k_cache, v_cache, tables, lens, *no_groups, torch.full((3,), -1), 0.125)
    assert_close(out, naive_decode(query, k_cache, v_cache, clean, lens, 0.125))
    out = op(query[:0], k_cache, v_cache, tables[:0], lens[:0], *no_groups, torch.zeros(0, dtype=torch.int64), 0.125)
    assert out.shape == (0, 9, 64)
    # Paths with no node: all -1, and no level at all.
    one_node = (torch.tensor([[tables[0, 0], -1]], dtype=torch.int32), torch.tensor([BLOCK], dtype=torch.int32))
    for seq_group in (torch.full((3, 2), -1), torch.zeros(3, 0, dtype=torch.int32)):
        out = op(query, k_cache, v_cache, tables, lens, *one_node, seq_group, 0.125)
        assert_close(out, naive_decode(query, k_cache, v_cache, clean, lens, 0.125))


# Trees of prefix nodes as make_cascade takes them: (groups, ungrouped, levels).
CASCADE_TREES = {
    # 3 problems x 4 beams on a 2-block system prompt: each problem's question, steps shared
    # by 2 beams, one beam that forked once more (4 levels, a node with 1 member); own
    # tokens at block boundaries and +-1, or none; 2 sequences in no node
    "problems": ([(2, [(1, [(1, [0, 1]), (1, [15, 16])]),
                       (2, [(1, [17, 16]), (2, [1, 0])]),
                       (1, [(1, [(1, [3]), 16]), (1, [15, 33])])])], [1, 40], None),
    # a chain 5 nodes deep with sequences ending at every depth, next to a second root with
    # 1 member and sequences in no node; one column of -1 padding past the depth
    "deep": ([(1, [0, (1, [16, (2, [1, (1, [15, (1, [17, 0, 33])])])])]), (3, [5])], [16, 17], 6),
    # 64 beams: 4 problems behind a 40-block prompt (long enough to be split), steps shared
    # by 4 beams
    "wide": ([(40, [(2, [(1, SUFFIXES), (1, [0, 17, 2, 31]), (1, SUFFIXES), (1, [0, 1, 33, 16])])] * 4)], [], None),
}


def cascade_tree_params():
    for dtype in DTYPES:
        for head_dim in (64, 128):
            for heads in HEADS:
                for case in CASCADE_TREES:
                    if case == "wide" and head_dim == 128:
                        continue  # the long case once per dtype x heads
                    yield pytest.param(dtype, head_dim, heads, case, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}-{case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,case", list(cascade_tree_params()))
def test_cascade_tree(impl, dtype, head_dim, heads, case):
    """Prefix trees of several levels; and the same tree flattened to a 1-D seq_group."""
    num_heads, kv_heads = HEADS[heads]
    groups, ungrouped, levels = CASCADE_TREES[case]
    index_dtype = torch.int64 if case == "deep" else torch.int32
    build = dict(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, index_dtype=index_dtype, seed=len(case))
    args, clean, _ = make_cascade(groups, ungrouped, levels=levels, **build)
    flat, flat_clean, _ = make_cascade(groups, ungrouped, one_level=True, **build)
    assert args["seq_group"].dim() == 2 and flat["seq_group"].dim() == 1 and torch.equal(clean, flat_clean)
    query = torch.randn(len(args["context_lens"]), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    plain = (query, args["k_cache"], args["v_cache"], clean, args["context_lens"], scale)
    k_before, v_before = args["k_cache"].clone(), args["v_cache"].clone()

    if impl == "cpp":
        out = ops.cascade_decode_attention(*cascade_args(args, query, scale))
        assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, scale)))
        assert_close(out, reference.paged_decode_attention(*plain))
        assert_close(out, ops.paged_decode_attention(*plain))
        assert_close(ops.cascade_decode_attention(*cascade_args(flat, query, scale)), out)
    else:
        out = reference.cascade_decode_attention(*cascade_args(args, query, scale))
        assert_close(out, naive_decode(*plain))
        assert_close(reference.cascade_decode_attention(*cascade_args(flat, query, scale)), out)
    assert torch.equal(args["k_cache"], k_before) and torch.equal(args["v_cache"], v_before)


def shared_below_private(kv_heads, head_dim, dtype, index_dtype=torch.int32):
    """Not a tree: three sequences each behind a 1-block node of their own, then a 2-block
    node all three share (the C++ kernel serves it once, the private nodes through each
    sequence's own tokens: two token ranges per sequence), and a sequence in no node."""
    k_cache, v_cache, tables, clean, lens = make_paged([53, 48, 65, 40], kv_heads, head_dim, dtype, index_dtype)
    shared = clean[0, 1:3].clone()
    tables[1:3, 1:3] = clean[1:3, 1:3] = shared
    prefix_tables = torch.tensor([[clean[0, 0], -1], [clean[1, 0], -1], [clean[2, 0], -1], shared.tolist()],
                                 dtype=index_dtype)
    prefix_lens = torch.tensor([1, 1, 1, 2], dtype=index_dtype) * BLOCK
    seq_group = torch.tensor([[0, 3], [1, 3], [2, 3], [-1, -1]], dtype=index_dtype)
    args = dict(k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens,
                prefix_tables=prefix_tables, prefix_lens=prefix_lens, seq_group=seq_group)
    return args, clean


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("heads", ["gqa1", "gqa3"])
def test_cascade_shared_node_below_private_ones(impl, dtype, heads):
    num_heads, kv_heads = HEADS[heads]
    args, clean = shared_below_private(kv_heads, 64, dtype)
    query = torch.randn(4, num_heads, 64).to(dtype)
    out = (ops if impl == "cpp" else reference).cascade_decode_attention(*cascade_args(args, query, 0.125))
    assert_close(out, naive_decode(query, args["k_cache"], args["v_cache"], clean, args["context_lens"], 0.125))


# ----------------------------------------------------------------------------- prm_step_score


def naive_prm_step_score(hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count,
                         aggregation):
    """float64 except where the op's semantics round: the normalized states go through the
    hidden dtype before the weight multiplies them."""
    x = hidden.double()
    if norm_weight is not None:
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        x = norm_weight.double() * x.to(hidden.dtype).double()
    logits = x @ head_weight.double().t()
    if head_bias is not None:
        logits = logits + head_bias.double()
    scores = logits[:, 0].sigmoid() if head_weight.shape[0] == 1 else logits.softmax(-1)[:, positive_index]
    aggregates = []
    for prev, count, score in zip(prev_agg.double().tolist(), prev_count.tolist(), scores.tolist()):
        if count == 0 or aggregation == "last":
            aggregates.append(score)
        elif aggregation == "min":
            aggregates.append(min(prev, score))
        elif aggregation == "prod":
            aggregates.append(prev * score)
        else:
            aggregates.append((prev * count + score) / (count + 1))
    return scores.float(), torch.tensor(aggregates).float()


def prm_inputs(num_rows, width, rows, dtype, count_dtype=torch.int64, seed=0, weight_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    hidden = (3 * torch.randn(num_rows, width, generator=gen)).to(dtype)
    norm_weight = (0.5 + torch.rand(width, generator=gen)).to(weight_dtype)
    # LM-head-like rows: logits of a few units, where the probability is informative
    head_weight = (torch.randn(rows, width, generator=gen) * width**-0.5).to(weight_dtype)
    head_bias = torch.randn(rows, generator=gen).to(weight_dtype)
    prev_agg = torch.rand(num_rows, generator=gen)
    prev_count = (torch.arange(num_rows) % 4).to(count_dtype)  # 0: the beam's first step
    return hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count


PRM_HEADS = {  # rows, positive_index, norm, bias
    "two-rows-pos1-norm": (2, 1, True, False),
    "two-rows-pos0-norm-bias": (2, 0, True, True),
    "value-head-bias": (1, 0, False, True),
    "value-head-norm": (1, 0, True, False),
}
PRM_SHAPES = [(1, 64), (7, 1000), (64, 576), (256, 4096)]  # 1000: not a multiple of a vector


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("head", PRM_HEADS)
@pytest.mark.parametrize("num_rows,width", PRM_SHAPES, ids=[f"n{n}-h{w}" for n, w in PRM_SHAPES])
def test_prm_step_score(impl, dtype, aggregation, head, num_rows, width):
    rows, positive_index, use_norm, use_bias = PRM_HEADS[head]
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        num_rows, width, rows, dtype, torch.int32 if use_bias else torch.int64, seed=num_rows + width
    )
    args = (hidden, norm_weight if use_norm else None, 1e-5, head_weight, head_bias if use_bias else None,
            positive_index, prev_agg, prev_count, aggregation)
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    oracle = reference.prm_step_score if impl == "cpp" else naive_prm_step_score

    scores, aggregates = op(*args)

    expected_scores, expected_aggregates = oracle(*args)
    assert scores.dtype == aggregates.dtype == torch.float32
    assert (scores - expected_scores).abs().max() <= TOL[dtype]
    assert (aggregates - expected_aggregates).abs().max() <= TOL[dtype]
    assert scores.data_ptr() != aggregates.data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float64, torch.float32),
     (torch.float32, torch.bfloat16)],
)
def test_prm_step_score_other_dtypes(impl, dtype, weight_dtype):
    """Weights in another dtype than the states (a float32 head on bfloat16 states, ...)."""
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        9, 200, 2, dtype, weight_dtype=weight_dtype
    )
    args = (hidden, norm_weight, 1e-6, head_weight, head_bias, 1, prev_agg, prev_count, "mean")
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    oracle = reference.prm_step_score if impl == "cpp" else naive_prm_step_score
    tol = TOL[torch.float32] if dtype in (torch.float32, torch.float64) else TOL[torch.bfloat16]
    for actual, expected in zip(op(*args), oracle(*args)):
        assert (actual - expected).abs().max() <= tol


@pytest.mark.parametrize("impl", IMPLS)
def test_prm_step_score_strided_hidden_and_empty(impl):
    """Tag rows sliced out of wider hidden states, and no tags at all."""
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    hidden, norm_weight, head_weight, _, prev_agg, prev_count = prm_inputs(5, 64, 2, torch.float32)
    wide = torch.randn(5, 3 * 64)
    wide[:, 64:128] = hidden
    args = (norm_weight, 1e-6, head_weight, None, 1, prev_agg, prev_count, "min")
    for actual, expected in zip(op(wide[:, 64:128], *args), naive_prm_step_score(hidden, *args)):
        assert (actual - expected).abs().max() <= TOL[torch.float32]
    scores, aggregates = op(torch.empty(0, 64), None, 1e-6, head_weight, None, 0, torch.empty(0),
                            torch.empty(0, dtype=torch.int32), "last")
    assert scores.shape == aggregates.shape == (0,)


# ----------------------------------------------------------------------------- data movement


def store_kv_inputs(num_tokens, kv_heads, head_dim, dtype, slot_dtype):
    """Keys, values, the two caches and shuffled slots with every third token padding (-1)."""
    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks = 2 * math.ceil(num_tokens / BLOCK) + 1
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * BLOCK, generator=gen)[:num_tokens]
    slots[::3] = -1
    return key, value, k_cache, v_cache, slots.to(slot_dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,kv_heads,head_dim", [(1, 1, 64), (7, 3, 64), (64, 3, 64), (33, 2, 128)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv(impl, dtype, num_tokens, kv_heads, head_dim, slot_dtype):
    key, value, k_cache, v_cache, slots = store_kv_inputs(num_tokens, kv_heads, head_dim, dtype, slot_dtype)
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


COPY_BLOCKS_CASES = [
    (1, [0], [5]),
    (3, [1, 2, 3, 7], [8, 9, 10, 11]),
    (2, [4, 4, 0], [1, 2, 3]),  # one source, several destinations
    (2, [1, 2, 5], [2, 3, 1]),  # destinations that are also sources
    (1, [], []),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,src,dst", COPY_BLOCKS_CASES)
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
    args, _, ctx_lens = make_cascade([(2, [1, 17, 0]), (1, [3])], [20], 2, 32, torch.float32)
    yield "cascade_decode_attention", cascade_args(args, torch.randn(len(ctx_lens), 4, 32), 0.2)
    args, _, ctx_lens = make_cascade([(1, [(1, [0, 3]), (2, [5])])], [20], 2, 32, torch.float32)
    yield "cascade_decode_attention", cascade_args(args, torch.randn(len(ctx_lens), 4, 32), 0.2)
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(3, 48, 2, torch.float32)
    yield "prm_step_score", (hidden, norm_weight, 1e-6, head_weight, head_bias, 1, prev_agg, prev_count, "mean")
    yield "prm_step_score", (hidden, None, 1e-6, head_weight[:1], None, 0, prev_agg, prev_count, "prod")


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.ttsearch, name).default, args)


# ----------------------------------------------------------------------------- validation


def test_cpp_serves_the_cpu():
    if not HAS_CPP:
        pytest.skip(NO_CPP)
    assert ops.IMPLEMENTATIONS["cpu"].startswith("cpp-")


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


def _cascade_error(mutate):
    """``mutate(args)`` breaks the arguments and returns the error it expects."""
    args, _, ctx_lens = make_cascade([(2, [1, 17]), (3, [5, 0, 16])], [9], 1, 32, torch.float32)
    match = mutate(args)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(ValueError, match=match):
        ops.cascade_decode_attention(*cascade_args(args, torch.randn(len(ctx_lens), 2, 32), 0.2))
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def _member(args, group, nth=0):
    return (args["seq_group"] == group).nonzero()[nth].item()


def test_cascade_member_without_the_prefix():
    def mutate(args):
        b = _member(args, 1, 1)
        args["block_tables"][b, 1] = args["block_tables"][_member(args, 0), 0]  # a valid id, not the prefix's
        return rf"sequence {b}'s block table does not start with the prefix blocks of its group 1: column 1"

    _cascade_error(mutate)


def test_cascade_context_shorter_than_its_prefix():
    def mutate(args):
        b = _member(args, 0)
        args["context_lens"][b] = 31
        return rf"sequence {b} has 31 tokens, fewer than the 32-token prefix of its group 0"

    _cascade_error(mutate)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("prefix_lens", [24, 48], "whole blocks"),  # not a multiple of the block size
        ("prefix_lens", [0, 48], "whole blocks"),
        ("prefix_lens", [32, 80], "needs 5 blocks"),  # past the prefix table's columns
        ("seq_group", "group 2", "seq_group spans"),
        ("prefix_tables", "bad id", "out of range"),
    ],
)
def test_cascade_bad_groups(field, value, match):
    def mutate(args):
        if value == "group 2":
            args["seq_group"][0] = 2
        elif value == "bad id":
            args["prefix_tables"][1, 2] = args["k_cache"].shape[0]
        else:
            args[field] = torch.tensor(value, dtype=args[field].dtype)
        return match

    _cascade_error(mutate)


def _cascade_tree_error(mutate):
    """``mutate(args)`` breaks a 3-level tree's arguments and returns the error it expects."""
    groups, ungrouped, _ = CASCADE_TREES["problems"]
    args, _, ctx_lens = make_cascade(groups, ungrouped, 1, 32, torch.float32)
    match = mutate(args)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises(ValueError, match=match):
        ops.cascade_decode_attention(*cascade_args(args, torch.randn(len(ctx_lens), 2, 32), 0.2))
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def _at_depth(args, depth):
    """The first sequence whose path is ``depth`` nodes long, and its path."""
    lengths = (args["seq_group"] >= 0).sum(1)
    b = int((lengths == depth).nonzero()[0, 0])
    return b, args["seq_group"][b, :depth].tolist()


def test_cascade_tree_node_after_a_gap():
    def mutate(args):
        b, path = _at_depth(args, 3)
        args["seq_group"][b, 1] = -1
        return rf"seq_group\[{b}, 2\] = {path[2]} follows a -1"

    _cascade_tree_error(mutate)


def test_cascade_tree_member_without_its_node_blocks():
    def mutate(args):
        b, path = _at_depth(args, 3)
        start = int(args["prefix_lens"][path[:2]].sum()) // BLOCK
        end = start + int(args["prefix_lens"][path[2]]) // BLOCK
        other, _ = _at_depth(args, 0)
        args["block_tables"][b, start] = args["block_tables"][other, 0]  # a valid id, not the node's
        return (rf"sequence {b}'s block table does not hold at columns \[{start}, {end}\) the prefix blocks of its "
                rf"group {path[2]} \(level 2\): column {start} holds block")

    _cascade_tree_error(mutate)


def test_cascade_tree_path_longer_than_the_context():
    def mutate(args):
        b, path = _at_depth(args, 3)
        total = int(args["prefix_lens"][path].sum())
        args["context_lens"][b] = total - 1
        return (rf"sequence {b} has {total - 1} tokens, fewer than the {total}-token prefix of its group {path[2]} "
                rf"at level 2")

    _cascade_tree_error(mutate)


def test_cascade_tree_node_at_two_levels():
    def mutate(args):
        b, path = _at_depth(args, 3)
        args["seq_group"][b, 2] = path[1]
        return rf"group {path[1]} is at level 2 of sequence {b}'s path"

    _cascade_tree_error(mutate)


def test_cascade_tree_bad_node():
    def mutate(args):
        b, _ = _at_depth(args, 3)
        args["seq_group"][b, 1] = args["prefix_lens"].shape[0]
        return rf"seq_group spans .*seq_group\[{b}, 1\] = {args['prefix_lens'].shape[0]}"

    _cascade_tree_error(mutate)


# ----------------------------------------------------------------------------- host-side checks


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def test_check_indices_false_reads_no_tensor_data():
    """Meta tensors have shapes but no data: an op that read an index tensor would raise."""
    k_cache, v_cache, tables, _, lens = make_paged([20, 5], 2, 32, torch.float32)
    query = torch.randn(2, 4, 32)
    prefix_tables, prefix_lens, seq_group = tables[:1, :1].clone(), torch.tensor([BLOCK], dtype=torch.int32), torch.tensor([0, -1], dtype=torch.int32)
    kv_cache = torch.randn(2, 1, 4, BLOCK, 2, 32)
    calls = {
        "store_kv": lambda m, **kw: ops.store_kv(m(torch.randn(2, 2, 32)), m(torch.randn(2, 2, 32)), m(k_cache), m(v_cache),
                                                  m(torch.tensor([0, 1])), **kw),
        "decode": lambda m, **kw: ops.paged_decode_attention(m(query), m(k_cache), m(v_cache), m(tables), m(lens), 0.2, **kw),
        "extend": lambda m, **kw: ops.paged_extend_attention(m(query), m(k_cache), m(v_cache), m(tables),
                                                              m(torch.tensor([0, 1, 2])), m(lens), 0.2, **kw),
        "cascade": lambda m, **kw: ops.cascade_decode_attention(m(query), m(k_cache), m(v_cache), m(tables), m(lens),
                                                                m(prefix_tables), m(prefix_lens), m(seq_group), 0.2, **kw),
        "copy_blocks": lambda m, **kw: ops.copy_blocks(m(kv_cache), m(torch.tensor([0])), m(torch.tensor([1])), **kw),
    }
    for name, call in calls.items():
        call(lambda t: t)  # the same arguments are valid with real data
        call(_meta, check_indices=False)
        with pytest.raises((NotImplementedError, RuntimeError)):  # the checks do read data
            call(_meta)


def test_check_metadata_names_the_bad_entry():
    k_cache, _, tables, _, lens = make_paged([20, 5], 1, 32, torch.float32)
    num_blocks = k_cache.shape[0]
    ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, 1]), torch.tensor([0, 1, 2], dtype=torch.int32))
    bad = tables.clone()
    bad[0, 1] = num_blocks
    with pytest.raises(ValueError, match=f"block id {num_blocks} out of range"):
        ops.check_metadata(num_blocks, BLOCK, bad, lens)
    with pytest.raises(ValueError, match="slot out of range"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, num_blocks * BLOCK]))
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, 1]), torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_group is missing"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, prefix_tables=tables[:1, :1].clone(),
                           prefix_lens=torch.tensor([BLOCK], dtype=torch.int32))
    with pytest.raises(ValueError, match="appears twice"):
        ops.check_block_copies(num_blocks, torch.tensor([0, 1]), torch.tensor([2, 2]))


def test_a_forward_checks_its_metadata_once_on_the_host(tiny_checkpoints, monkeypatch):
    """Every layer's ops skip the index checks: the model runner ran them once, on host tensors."""
    from ttsearch.engine.engine import Engine
    from ttsearch.engine.sampler import SamplingParams

    engine = Engine(str(tiny_checkpoints["llama3"]), dtype=torch.float32, kv_cache_bytes=1 << 22, block_size=BLOCK,
                    progress=False)
    layers = engine.model.config.num_layers
    assert layers > 1
    checked: list[torch.device] = []
    real = checks.check_block_table_indices

    def counting(block_tables, *args):
        checked.append(block_tables.device)
        return real(block_tables, *args)

    monkeypatch.setattr(checks, "check_block_table_indices", counting)
    root = engine.add(list(range(3, 3 + 2 * BLOCK + 3)))  # an extend forward
    beams = engine.fork(root, 3)
    engine.step(beams, [SamplingParams(temperature=1.0, seed=i) for i in range(3)])  # a cascade decode forward
    engine.step(beams[:1])  # a plain decode forward
    assert checked == [torch.device("cpu")] * 3  # once per forward, not once per layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_forward_never_waits_for_the_device(tiny_checkpoints):
    """Extend, cascade decode and plain decode forwards with CUDA's sync debug mode set to
    error: any device-to-host copy or synchronization in any layer raises. Then whole engine
    steps, sampling included, in warn mode: the one synchronization each makes is reading
    its sampled tokens back (``sampler.py``'s ``tokens.tolist()``)."""
    import inspect
    import warnings

    from ttsearch.engine import sampler
    from ttsearch.engine.engine import Engine
    from ttsearch.engine.sampler import SamplingParams

    engine = Engine(str(tiny_checkpoints["llama3"]), dtype=torch.bfloat16, device="cuda", kv_cache_bytes=1 << 22,
                    block_size=BLOCK, progress=False)
    root = engine.add(list(range(3, 3 + 2 * BLOCK + 3)))
    beams = engine.fork(root, 3)
    runner = engine.runner
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.forward(beams, [[5], [6], [7]], logits=False)  # cascade decode, with a copy-on-write of the tail
        runner.forward(beams[:1], [[8]], logits=False)  # plain decode
        runner.forward(beams[1:2], [[9, 10, 11]], logits=False)  # extend
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    sampling = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1), SamplingParams(temperature=1.2, seed=2),
                SamplingParams()]
    engine.append_batch(beams, [[12], [13], [14]])  # next-token logits for every beam
    engine.step(beams, sampling)  # every CUDA graph this test replays is captured
    engine.step(beams[:1], sampling[:1])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step(beams, sampling)  # cascade decode
            engine.step(beams[:1], sampling[:1])  # plain decode
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [(w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message)]
    source, first = inspect.getsourcelines(sampler.sample)
    tolist = first + next(i for i, line in enumerate(source) if "tokens.tolist()" in line)
    assert syncs and set(syncs) == {(sampler.__file__, tolist)}, syncs
