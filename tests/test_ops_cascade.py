"""cascade_decode_attention, every implementation (see ops_cases.py): one level of shared
prefixes and trees of them, against plain paged decode; the errors its checks name; and the
Triton kernel's split-KV.
"""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import (ATTENTION_CASES, BLOCK, CASCADE_TREES, CASCADES, DTYPES, HEADS, IMPLS, POISON_CASES, SUFFIXES,
                       TOL, assert_close, assert_within, cascade_args, cascade_inputs, cascade_module, cpp_only,
                       decode_attention, device, make_cascade, make_paged, naive_decode, on, op_and_oracle,
                       poison_unused, shared_below_private)
from ttsearch.ops import reference



# ----------------------------------------------------------------------------- reference and C++


def cascade_params():
    """One-level cases (``CASCADES``) and trees (``CASCADE_TREES``), per dtype, head dim and GQA shape."""
    for dtype in DTYPES:
        for head_dim in (64, 128):
            for heads in HEADS:
                for case in [*CASCADES, *CASCADE_TREES]:
                    if case == "wide" and head_dim == 128:
                        continue  # the long case once per dtype x heads
                    yield pytest.param(dtype, head_dim, heads, case, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}-{case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,head_dim,heads,case", list(cascade_params()))
def test_cascade_decode_attention(impl, dtype, head_dim, heads, case):
    """The cascade against plain paged decode, for one level of groups and for prefix trees of
    several levels; and the same batch in the other layout: one-level groups as paths of one
    level (seq_group ``[B, 1]``), a tree flattened to a 1-D seq_group."""
    num_heads, kv_heads = HEADS[heads]
    if case in CASCADES:
        groups, ungrouped = CASCADES[case]
        args, clean, _ = make_cascade(groups, ungrouped, kv_heads, head_dim, dtype,
                                      index_dtype=torch.int64 if case == "mixed" else torch.int32)
        other = dict(args, seq_group=args["seq_group"][:, None])
    else:
        groups, ungrouped, levels = CASCADE_TREES[case]
        index_dtype = torch.int64 if case == "deep" else torch.int32
        build = dict(kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, index_dtype=index_dtype, seed=len(case))
        args, clean, _ = make_cascade(groups, ungrouped, levels=levels, **build)
        other, other_clean, _ = make_cascade(groups, ungrouped, one_level=True, **build)
        assert args["seq_group"].dim() == 2 and other["seq_group"].dim() == 1 and torch.equal(clean, other_clean)
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
    op = ops.cascade_decode_attention if impl == "cpp" else reference.cascade_decode_attention
    assert_close(op(*cascade_args(other, query, scale)), out)
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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("heads", ["gqa1", "gqa3"])
def test_cascade_shared_node_below_private_ones(impl, dtype, heads):
    num_heads, kv_heads = HEADS[heads]
    args, clean = shared_below_private(kv_heads, 64, dtype)
    query = torch.randn(4, num_heads, 64).to(dtype)
    out = (ops if impl == "cpp" else reference).cascade_decode_attention(*cascade_args(args, query, 0.125))
    assert_close(out, naive_decode(query, args["k_cache"], args["v_cache"], clean, args["context_lens"], 0.125))


# ----------------------------------------------------------------------------- errors


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


# ----------------------------------------------------------------------------- Triton


# Groups as (prefix blocks, [suffix length of each member]), then ungrouped context lengths:
# groups of 1, 3 and 6 members behind prefixes of 1, 2 and 5 blocks, members whose context
# is the prefix alone (suffix 0), suffixes at a block boundary and +-1, an empty group, and
# sequences in no group (100 tokens: several key tiles).
CASCADE = ([(1, [16, 0]), (2, [1, 17, 15]), (5, [0, 1, 15, 16, 17, 33]), (2, [])], [1, 16, 17, 100])


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_triton_cascade_decode_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    index_dtype = torch.int64 if head_dim == 128 else torch.int32
    args, clean, _, query = cascade_inputs(*CASCADE, num_heads, kv_heads, head_dim, dtype, index_dtype)
    scale = head_dim**-0.5
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), scale))

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, query, scale)), TOL[dtype])
    # A sequence in no group takes exactly the decode kernel's path.
    decode = decode_attention.paged_decode_attention(query.to(device), on_device["k_cache"], on_device["v_cache"],
                                                     clean.to(device), on_device["context_lens"], scale)
    ungrouped = args["seq_group"] < 0
    assert torch.equal(out.cpu()[ungrouped], decode.cpu()[ungrouped])
    assert torch.equal(on_device["k_cache"].cpu(), args["k_cache"])
    assert torch.equal(on_device["v_cache"].cpu(), args["v_cache"])


@pytest.mark.parametrize("members,heads,dtype", [
    pytest.param(1, "gqa3", torch.float32, id="1-gqa3-float32"),
    pytest.param(10, "gqa3", torch.float32, id="10-gqa3-float32"),  # one full tile (10 x 3 heads in 32 rows)
    pytest.param(11, "gqa3", torch.float32, id="11-gqa3-float32"),  # a full tile and one member more
    pytest.param(21, "gqa3", torch.bfloat16, id="21-gqa3-bfloat16"),  # one full tile (21 x 3 heads in 64 rows)
    pytest.param(22, "gqa3", torch.bfloat16, id="22-gqa3-bfloat16"),  # a full tile and one member more
    pytest.param(40, "gqa8", torch.float32, id="40-gqa8-float32"),  # ten tiles of 4
    pytest.param(65, "gqa1", torch.bfloat16, id="65-gqa1-bfloat16"),  # tiles of 64 and 1
])
def test_triton_cascade_group_sizes(device, members, heads, dtype):
    """One group of ``members`` behind a 3-block prefix, either side of a full tile of
    members, with an ungrouped sequence."""
    num_heads, kv_heads = HEADS[heads]
    suffixes = ([0, 1, 15, 16, 17] * 8)[:members]
    args, _, _, query = cascade_inputs([(3, suffixes)], [20], num_heads, kv_heads, 64, dtype, seed=members)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", POISON_CASES)
def test_triton_cascade_never_reads_past_a_context(device, dtype, index_dtype, case):
    """NaN in every slot outside the contexts (the blocks of a node no sequence holds too)
    must not reach the output; table entries past a context, and prefix-table entries past
    a prefix, hold -1 or a huge block id."""
    groups, _ = POISON_CASES[case]
    args, clean, ctx_lens, query = cascade_inputs(groups, [70, 2], 9, 3, 64, dtype, index_dtype, seed=3)
    poisoned = dict(args, k_cache=poison_unused(args["k_cache"], clean, ctx_lens),
                    v_cache=poison_unused(args["v_cache"], clean, ctx_lens))
    poisoned = dict(zip(poisoned, on(device, *poisoned.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(poisoned, query.to(device), 0.125))

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_triton_cascade_tree(device, dtype, head_dim, heads):
    """3 problems x 4 beams on a system prompt, with shared steps (4 levels); and the same
    tree flattened to a 1-D seq_group."""
    num_heads, kv_heads = HEADS[heads]
    groups, ungrouped, levels = CASCADE_TREES["problems"]
    index_dtype = torch.int64 if head_dim == 128 else torch.int32
    args, clean, _, query = cascade_inputs(groups, ungrouped, num_heads, kv_heads, head_dim, dtype, index_dtype,
                                           seed=5, levels=levels)
    flat, _, _, _ = cascade_inputs(groups, ungrouped, num_heads, kv_heads, head_dim, dtype, index_dtype, seed=5,
                                   one_level=True)
    scale = head_dim**-0.5
    on_device = dict(zip(args, on(device, *args.values())))
    flat_on_device = dict(zip(flat, on(device, *flat.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), scale))
    out_flat = cascade_module.cascade_decode_attention(*cascade_args(flat_on_device, query.to(device), scale))

    expected = reference.cascade_decode_attention(*cascade_args(args, query, scale))
    assert_within(out, expected, TOL[dtype])
    assert_within(out_flat, expected, TOL[dtype])
    assert_within(out, reference.paged_decode_attention(query, args["k_cache"], args["v_cache"], clean,
                                                       args["context_lens"], scale), TOL[dtype])
    # A sequence in no node takes exactly the decode kernel's path.
    decode = decode_attention.paged_decode_attention(query.to(device), on_device["k_cache"], on_device["v_cache"],
                                                     clean.to(device), on_device["context_lens"], scale)
    no_node = (args["seq_group"] < 0).all(1)
    assert no_node.any() and torch.equal(out.cpu()[no_node], decode.cpu()[no_node])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_triton_cascade_deep_tree(device, dtype):
    """A chain 5 nodes deep with sequences at every depth, -1 padding past the depth, a
    root with 1 member and sequences in no node."""
    groups, ungrouped, levels = CASCADE_TREES["deep"]
    args, _, _, query = cascade_inputs(groups, ungrouped, 8, 2, 64, dtype, torch.int64, seed=6, levels=levels)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("heads", ["gqa1", "gqa3"])
def test_triton_cascade_shared_node_below_private_ones(device, heads):
    num_heads, kv_heads = HEADS[heads]
    args, clean = shared_below_private(kv_heads, 64, torch.float32)
    query = torch.randn(4, num_heads, 64)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    expected = reference.paged_decode_attention(query, args["k_cache"], args["v_cache"], clean,
                                                args["context_lens"], 0.125)
    assert_within(out, expected, TOL[torch.float32])


def test_triton_cascade_on_strided_caches(device):
    """K and V pools as views of one [2, layers, ...] cache, a query sliced out of a wider tensor."""
    args, _, ctx_lens, _ = cascade_inputs([(2, [0, 5, 17])], [20], 4, 2, 64, torch.float32, seed=4)
    k_cache, v_cache = args["k_cache"], args["v_cache"]
    kv_cache = torch.stack([torch.zeros_like(k_cache), k_cache, torch.zeros_like(k_cache), v_cache]).view(
        2, 2, *k_cache.shape
    )
    qkv = torch.randn(len(ctx_lens), 8, 64)
    kv_dev, qkv_dev = on(device, kv_cache, qkv)
    strided = dict(zip(args, on(device, *args.values())), k_cache=kv_dev[0, 1], v_cache=kv_dev[1, 1])

    out = cascade_module.cascade_decode_attention(*cascade_args(strided, qkv_dev[:, 4:], 0.125))

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, qkv[:, 4:], 0.125)), TOL[torch.float32])


def test_triton_cascade_without_groups_and_empty(device):
    k_cache, v_cache, tables, clean, lens = make_paged([33, 1, 17], 3, 64, torch.float32)
    query = torch.randn(3, 9, 64)
    no_groups = [torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.full((3,), -1)]
    args = on(device, query, k_cache, v_cache, tables, lens, *no_groups)

    out = cascade_module.cascade_decode_attention(*args, 0.125)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125)
    assert_within(out, expected, TOL[torch.float32])
    # An empty batch, with and without groups.
    one_group = on(device, torch.zeros(1, 2, dtype=torch.int32), torch.full((1,), BLOCK, dtype=torch.int32))
    for prefix_tables, prefix_lens in (args[5:7], one_group):
        out = cascade_module.cascade_decode_attention(args[0][:0], *args[1:3], args[3][:0], args[4][:0],
                                                      prefix_tables, prefix_lens, args[7][:0], 0.125)
        assert out.shape == (0, 9, 64)
    # Paths with no node: all -1, and no level at all.
    for seq_group in (torch.full((3, 2), -1), torch.zeros(3, 0, dtype=torch.int32)):
        out = cascade_module.cascade_decode_attention(*args[:5], *one_group, seq_group.to(device), 0.125)
        assert_within(out, expected, TOL[torch.float32])


# A 5-block root node (several key tiles) holding a sequence whose context ends with it, one
# with 20 tokens of its own, and a 1-block child node with two members; a sequence in no
# node. One level (each path flattened to one node) or two.
SPLIT_TREE = ([(5, [0, 20, (1, [1, 16])])], [33])


@pytest.mark.parametrize("splits,node_splits,one_level,dtype", [
    pytest.param(1, 3, True, torch.float32, id="1x3-one-level-float32"),
    pytest.param(3, 1, False, torch.bfloat16, id="3x1-two-levels-bfloat16"),
    pytest.param(2, 2, False, torch.float32, id="2x2-two-levels-float32"),
    pytest.param(4, 5, True, torch.bfloat16, id="4x5-one-level-bfloat16"),
])
def test_triton_cascade_split_kv(device, splits, node_splits, one_level, dtype):
    """Tails split ``splits`` ways and nodes ``node_splits`` ways (more than a node's tiles:
    empty node splits) match the reference; a sequence in no node matches the split decode
    kernel exactly."""
    args, clean, ctx_lens, query = cascade_inputs(*SPLIT_TREE, 8, 2, 64, dtype, seed=9, one_level=one_level)
    poisoned = dict(args, k_cache=poison_unused(args["k_cache"], clean, ctx_lens),
                    v_cache=poison_unused(args["v_cache"], clean, ctx_lens))
    on_device = dict(zip(poisoned, on(device, *poisoned.values())))

    out = cascade_module.cascade_decode_attention_split(*cascade_args(on_device, query.to(device), 0.125),
                                                        num_splits=splits, node_splits=node_splits)

    assert_within(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])
    no_node = (args["seq_group"] < 0).view(len(ctx_lens), -1).all(1)
    decode = decode_attention.paged_decode_attention_split(
        query[no_node].to(device), on_device["k_cache"], on_device["v_cache"], clean[no_node].to(device),
        on_device["context_lens"][no_node.to(device)], 0.125, num_splits=splits)
    assert torch.equal(out.cpu()[no_node], decode.cpu())
