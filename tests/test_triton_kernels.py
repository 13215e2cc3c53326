"""The Triton kernels against the reference ops, launched directly (not through the dispatcher).

Every case runs on CPU tensors through Triton's interpreter and, on a CUDA machine, natively
on the GPU too. Data movement must be exact; attention and scores within TOL of the
reference, computed on the CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch

# Triton fixes a function's mode (interpreted or compiled) when it is decorated, so the
# interpreter must be on before triton is first imported. Anything that imported triton
# earlier in the session, and a CUDA machine (which keeps native kernels), is handled by the
# ``device`` fixture.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not importable: no Triton kernels to test")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

with contextlib.suppress(ImportError):  # Triton imports it at the first launch: see ``device``
    import triton.experimental.gluon  # noqa: F401

import ttsearch.ops as ops  # noqa: E402
from ttsearch.aggregation import AGGREGATIONS  # noqa: E402
from test_ops import (  # noqa: E402  (tests/ is on sys.path under pytest)
    CASCADE_TREES,
    COPY_BLOCKS_CASES,
    HEADS,
    POISON_CASES,
    cascade_args,
    make_cascade,
    make_paged,
    poison_unused,
    query_lens_for,
    shared_below_private,
    store_kv_inputs,
)
from ttsearch.kernels import cascade_decode_attention as cascade_module  # noqa: E402
from ttsearch.kernels import copy_blocks as copy_blocks_module  # noqa: E402
from ttsearch.kernels import decode_attention, extend_attention, prm_step_score, store_kv  # noqa: E402
from ttsearch.kernels import split_kv  # noqa: E402
from ttsearch.kernels.attention_tile import row_tile  # noqa: E402
from ttsearch.kernels.registration import register_cuda  # noqa: E402
from ttsearch.kernels import activation as activation_module  # noqa: E402
from ttsearch.kernels import rms_norm as rms_norm_module  # noqa: E402
from ttsearch.kernels import quantized_linear as quantized_linear_module  # noqa: E402
from ttsearch.kernels import rotary as rotary_module  # noqa: E402
from ttsearch.kernels import sampling as sampling_module  # noqa: E402
from ttsearch.ops import reference, registry  # noqa: E402

KERNEL_MODULES = [store_kv, decode_attention, cascade_module, extend_attention, copy_blocks_module, prm_step_score,
                  split_kv]
LAUNCHERS = {
    "store_kv": store_kv.store_kv,
    "paged_decode_attention": decode_attention.paged_decode_attention,
    "cascade_decode_attention": cascade_module.cascade_decode_attention,
    "paged_extend_attention": extend_attention.paged_extend_attention,
    "copy_blocks": copy_blocks_module.copy_blocks,
    "prm_step_score": prm_step_score.prm_step_score,
    "rms_norm": rms_norm_module.rms_norm,
    "fused_add_rms_norm": rms_norm_module.fused_add_rms_norm,
    "rotary_embedding": rotary_module.rotary_embedding,
    "silu_and_mul": activation_module.silu_and_mul,
    "sample_tokens": sampling_module.sample_tokens,
    "quantized_linear": quantized_linear_module.quantized_linear,
}

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
BLOCK = 16


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The device the launchers run on: CPU tensors through the interpreter, CUDA natively.

    For a CPU case, every compiled Triton function the kernels reach (theirs, and
    triton.language's own, such as tl.sum) is swapped for an interpreted twin for the
    duration of the test. (Triton imports triton.experimental.gluon at its first launch, and
    that import needs the compiled ones: it was imported above, before any swap.)
    """
    if request.param == "cpu":
        for module in (tl, tl.standard, *KERNEL_MODULES):
            for name, fn in list(vars(module).items()):
                if isinstance(fn, JITFunction):
                    monkeypatch.setattr(module, name, InterpretedFunction(fn.fn))
    return torch.device(request.param)


def assert_close(actual, expected, tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "NaN in the output"
    err = (actual.cpu().float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------- paged inputs


def on(device, *tensors):
    """Copies on ``device`` (never the CPU originals: those stay the reference's inputs)."""
    return [t.to(device, copy=True) for t in tensors]


# ----------------------------------------------------------------------------- attention

# A single-token context, block boundaries and +-1, ragged lengths; 100 spans several key tiles.
CONTEXT_LENS = [1, 15, 16, 17, 33, 100]
ATTENTION_CASES = [
    pytest.param(dtype, head_dim, heads, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}")
    for dtype in DTYPES
    for head_dim in (64, 128)
    for heads in HEADS
]


def extend_batch(ctx_lens, num_heads, head_dim, dtype, index_dtype, seed=1):
    """New tokens per sequence mixing full prefills, single tokens, chunks and none."""
    q_lens = query_lens_for(ctx_lens)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=index_dtype)
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    return query, starts


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_paged_decode_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(CONTEXT_LENS, kv_heads, head_dim, dtype)
    query = torch.randn(len(CONTEXT_LENS), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    args = on(device, query, k_cache, v_cache, tables, lens)

    out = decode_attention.paged_decode_attention(*args, scale)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, scale)
    assert_close(out, expected, TOL[dtype])
    assert torch.equal(args[1].cpu(), k_cache) and torch.equal(args[2].cpu(), v_cache)


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_paged_extend_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(CONTEXT_LENS, kv_heads, head_dim, dtype, torch.int64)
    query, starts = extend_batch(CONTEXT_LENS, num_heads, head_dim, dtype, torch.int64)
    scale = head_dim**-0.5

    out = extend_attention.paged_extend_attention(*on(device, query, k_cache, v_cache, tables, starts, lens), scale)

    expected = reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, scale)
    assert_close(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", ["gqa3", "gqa8"])
def test_extend_tiles_fill_the_grid(device, dtype, heads):
    """Every sequence one token past a whole tile of new tokens: the batch needs exactly the
    ceil(tokens / BLOCK_M) + sequences - 1 programs the grid launches: one program short
    would leave the last tile's rows unwritten."""
    num_heads, kv_heads = HEADS[heads]
    group = num_heads // kv_heads
    block_m = row_tile(dtype, group)[0] // group
    q_lens = [block_m + 1] * 3
    ctx_lens = [q + extra for q, extra in zip(q_lens, (0, 20, 47))]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, kv_heads, 64, dtype, seed=4)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert sum(triton.cdiv(q, block_m) for q in q_lens) == triton.cdiv(sum(q_lens), block_m) + len(q_lens) - 1

    out = extend_attention.paged_extend_attention(*on(device, query, k_cache, v_cache, tables, starts, lens), 0.125)

    expected = reference.paged_extend_attention(query, k_cache, v_cache, clean, starts, lens, 0.125)
    assert_close(out, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name", ["paged_decode_attention", "paged_extend_attention"])
def test_attention_never_reads_past_a_context(device, dtype, op_name):
    """NaN in every slot outside the contexts must not reach the output."""
    ctx_lens = [15, 17, 1, 70, 33]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 3, 64, dtype, seed=2)
    k_poisoned, v_poisoned = poison_unused(k_cache, clean, ctx_lens), poison_unused(v_cache, clean, ctx_lens)
    if op_name == "paged_decode_attention":
        query = torch.randn(len(ctx_lens), 9, 64).to(dtype)
        extra = []
    else:
        query, starts = extend_batch(ctx_lens, 9, 64, dtype, torch.int32)
        extra = [starts]

    out = LAUNCHERS[op_name](*on(device, query, k_poisoned, v_poisoned, tables, *extra, lens), 0.125)

    expected = getattr(reference, op_name)(query, k_cache, v_cache, clean, *extra, lens, 0.125)
    assert_close(out, expected, TOL[dtype])


def test_attention_on_strided_caches(device):
    """K and V pools as views of one [2, layers, ...] cache, a query sliced out of a wider tensor."""
    ctx_lens = [20, 3]
    k_cache, v_cache, tables, clean, lens = make_paged(ctx_lens, 2, 64, torch.float32, seed=3)
    kv_cache = torch.stack([torch.zeros_like(k_cache), k_cache, torch.zeros_like(k_cache), v_cache]).view(
        2, 2, *k_cache.shape
    )
    qkv = torch.randn(2, 8, 64)
    kv_cache, qkv, tables, lens = on(device, kv_cache, qkv, tables, lens)

    out = decode_attention.paged_decode_attention(qkv[:, :4], kv_cache[0, 1], kv_cache[1, 1], tables, lens, 0.125)

    expected = reference.paged_decode_attention(qkv[:, :4].cpu(), k_cache, v_cache, clean, lens.cpu(), 0.125)
    assert_close(out, expected, TOL[torch.float32])


def test_attention_empty_batches(device):
    k_cache, v_cache, tables, _, lens = on(device, *make_paged([5], 1, 64, torch.float32))
    out = decode_attention.paged_decode_attention(torch.randn(0, 2, 64, device=device), k_cache, v_cache,
                                                  tables[:0], lens[:0], 0.2)
    assert out.shape == (0, 2, 64)
    starts = torch.tensor([0, 0], dtype=torch.int32, device=device)
    out = extend_attention.paged_extend_attention(torch.randn(0, 2, 64, device=device), k_cache, v_cache,
                                                  tables, starts, lens, 0.2)
    assert out.shape == (0, 2, 64)


# ----------------------------------------------------------------------------- cascade decode attention

# Groups as (prefix blocks, [suffix length of each member]), then ungrouped context lengths:
# groups of 1, 3 and 6 members behind prefixes of 1, 2 and 5 blocks, members whose context
# is the prefix alone (suffix 0), suffixes at a block boundary and +-1, an empty group, and
# sequences in no group (100 tokens: several key tiles).
CASCADE = ([(1, [16, 0]), (2, [1, 17, 15]), (5, [0, 1, 15, 16, 17, 33]), (2, [])], [1, 16, 17, 100])


def cascade_inputs(groups, ungrouped, num_heads, kv_heads, head_dim, dtype, index_dtype=torch.int32, seed=0, **tree):
    args, clean, ctx_lens = make_cascade(groups, ungrouped, kv_heads, head_dim, dtype, index_dtype=index_dtype,
                                         seed=seed, **tree)
    query = torch.randn(len(ctx_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return args, clean, ctx_lens, query


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_cascade_decode_attention(device, dtype, head_dim, heads):
    num_heads, kv_heads = HEADS[heads]
    index_dtype = torch.int64 if head_dim == 128 else torch.int32
    args, clean, _, query = cascade_inputs(*CASCADE, num_heads, kv_heads, head_dim, dtype, index_dtype)
    scale = head_dim**-0.5
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), scale))

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, scale)), TOL[dtype])
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
def test_cascade_group_sizes(device, members, heads, dtype):
    """One group of ``members`` behind a 3-block prefix, either side of a full tile of
    members, with an ungrouped sequence."""
    num_heads, kv_heads = HEADS[heads]
    suffixes = ([0, 1, 15, 16, 17] * 8)[:members]
    args, _, _, query = cascade_inputs([(3, suffixes)], [20], num_heads, kv_heads, 64, dtype, seed=members)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("case", POISON_CASES)
def test_cascade_never_reads_past_a_context(device, dtype, index_dtype, case):
    """NaN in every slot outside the contexts (the blocks of a node no sequence holds too)
    must not reach the output; table entries past a context, and prefix-table entries past
    a prefix, hold -1 or a huge block id."""
    groups, _ = POISON_CASES[case]
    args, clean, ctx_lens, query = cascade_inputs(groups, [70, 2], 9, 3, 64, dtype, index_dtype, seed=3)
    poisoned = dict(args, k_cache=poison_unused(args["k_cache"], clean, ctx_lens),
                    v_cache=poison_unused(args["v_cache"], clean, ctx_lens))
    poisoned = dict(zip(poisoned, on(device, *poisoned.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(poisoned, query.to(device), 0.125))

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("dtype,head_dim,heads", ATTENTION_CASES)
def test_cascade_tree(device, dtype, head_dim, heads):
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
    assert_close(out, expected, TOL[dtype])
    assert_close(out_flat, expected, TOL[dtype])
    assert_close(out, reference.paged_decode_attention(query, args["k_cache"], args["v_cache"], clean,
                                                       args["context_lens"], scale), TOL[dtype])
    # A sequence in no node takes exactly the decode kernel's path.
    decode = decode_attention.paged_decode_attention(query.to(device), on_device["k_cache"], on_device["v_cache"],
                                                     clean.to(device), on_device["context_lens"], scale)
    no_node = (args["seq_group"] < 0).all(1)
    assert no_node.any() and torch.equal(out.cpu()[no_node], decode.cpu()[no_node])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_cascade_deep_tree(device, dtype):
    """A chain 5 nodes deep with sequences at every depth, -1 padding past the depth, a
    root with 1 member and sequences in no node."""
    groups, ungrouped, levels = CASCADE_TREES["deep"]
    args, _, _, query = cascade_inputs(groups, ungrouped, 8, 2, 64, dtype, torch.int64, seed=6, levels=levels)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])


@pytest.mark.parametrize("heads", ["gqa1", "gqa3"])
def test_cascade_shared_node_below_private_ones(device, heads):
    num_heads, kv_heads = HEADS[heads]
    args, clean = shared_below_private(kv_heads, 64, torch.float32)
    query = torch.randn(4, num_heads, 64)
    on_device = dict(zip(args, on(device, *args.values())))

    out = cascade_module.cascade_decode_attention(*cascade_args(on_device, query.to(device), 0.125))

    expected = reference.paged_decode_attention(query, args["k_cache"], args["v_cache"], clean,
                                                args["context_lens"], 0.125)
    assert_close(out, expected, TOL[torch.float32])


def test_cascade_on_strided_caches(device):
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

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, qkv[:, 4:], 0.125)), TOL[torch.float32])


def test_cascade_without_groups_and_empty(device):
    k_cache, v_cache, tables, clean, lens = make_paged([33, 1, 17], 3, 64, torch.float32)
    query = torch.randn(3, 9, 64)
    no_groups = [torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.full((3,), -1)]
    args = on(device, query, k_cache, v_cache, tables, lens, *no_groups)

    out = cascade_module.cascade_decode_attention(*args, 0.125)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125)
    assert_close(out, expected, TOL[torch.float32])
    # An empty batch, with and without groups.
    one_group = on(device, torch.zeros(1, 2, dtype=torch.int32), torch.full((1,), BLOCK, dtype=torch.int32))
    for prefix_tables, prefix_lens in (args[5:7], one_group):
        out = cascade_module.cascade_decode_attention(args[0][:0], *args[1:3], args[3][:0], args[4][:0],
                                                      prefix_tables, prefix_lens, args[7][:0], 0.125)
        assert out.shape == (0, 9, 64)
    # Paths with no node: all -1, and no level at all.
    for seq_group in (torch.full((3, 2), -1), torch.zeros(3, 0, dtype=torch.int32)):
        out = cascade_module.cascade_decode_attention(*args[:5], *one_group, seq_group.to(device), 0.125)
        assert_close(out, expected, TOL[torch.float32])


# ----------------------------------------------------------------------------- split-KV

# 1 token, exactly one block, a partial last block, three key tiles of 64 (five of 32 in
# float32): with 5 splits the short contexts leave splits empty. Unused cache slots hold NaN throughout.
SPLIT_CONTEXT_LENS = [1, 16, 17, 150]


@pytest.mark.parametrize("splits,heads,dtype", [
    pytest.param(1, "gqa4", torch.float32, id="1-gqa4-float32"),
    pytest.param(2, "gqa4", torch.bfloat16, id="2-gqa4-bfloat16"),
    pytest.param(5, "gqa8", torch.float32, id="5-gqa8-float32"),
    pytest.param(5, "gqa1", torch.bfloat16, id="5-gqa1-bfloat16"),
])
def test_decode_split_kv(device, splits, heads, dtype):
    num_heads, kv_heads = HEADS[heads]
    k_cache, v_cache, tables, clean, lens = make_paged(SPLIT_CONTEXT_LENS, kv_heads, 64, dtype, seed=7)
    poisoned = [poison_unused(c, clean, SPLIT_CONTEXT_LENS) for c in (k_cache, v_cache)]
    query = torch.randn(len(SPLIT_CONTEXT_LENS), num_heads, 64).to(dtype)

    out = decode_attention.paged_decode_attention_split(*on(device, query, *poisoned, tables, lens), 0.125,
                                                        num_splits=splits)

    expected = reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125)
    assert_close(out, expected, TOL[dtype])


def test_choose_splits(monkeypatch):
    cpu = torch.device("cpu")
    target = 2 * split_kv.sm_count(cpu)
    long = 1 << 20
    assert split_kv.choose_splits(target, long, cpu) == 1  # the grid fills the GPU: no merge
    assert split_kv.choose_splits(1, long, cpu) == target
    assert split_kv.choose_splits(3, long, cpu) == triton.cdiv(target, 3)
    assert split_kv.choose_splits(1, 3 * split_kv.MIN_SPLIT_TOKENS + 5, cpu) == 3  # splits stay long
    assert split_kv.choose_splits(1, split_kv.MIN_SPLIT_TOKENS - 1, cpu) == 1
    monkeypatch.setattr(split_kv, "INTERPRETER_SMS", 10_000)
    assert split_kv.choose_splits(1, long, cpu) == split_kv.MAX_SPLITS
    from ttsearch import batch_invariant

    monkeypatch.setattr(batch_invariant, "_enabled", True)  # no count chosen from the batch
    assert split_kv.choose_splits(1, long, cpu) == 1


def test_decode_split_kv_by_default(device):
    """One long sequence alone splits by default (under the interpreter and on a GPU)."""
    k_cache, v_cache, tables, clean, lens = make_paged([600], 1, 64, torch.float32, seed=8)
    query = torch.randn(1, 2, 64)
    args = on(device, query, k_cache, v_cache, tables, lens)
    assert split_kv.choose_splits(1, tables.shape[1] * BLOCK, torch.device(device)) > 1

    out = decode_attention.paged_decode_attention(*args, 0.125)

    assert_close(out, reference.paged_decode_attention(query, k_cache, v_cache, clean, lens, 0.125),
                 TOL[torch.float32])


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
def test_cascade_split_kv(device, splits, node_splits, one_level, dtype):
    """Tails split ``splits`` ways and nodes ``node_splits`` ways (more than a node's tiles:
    empty node splits) match the reference; a sequence in no node matches the split decode
    kernel exactly."""
    args, clean, ctx_lens, query = cascade_inputs(*SPLIT_TREE, 8, 2, 64, dtype, seed=9, one_level=one_level)
    poisoned = dict(args, k_cache=poison_unused(args["k_cache"], clean, ctx_lens),
                    v_cache=poison_unused(args["v_cache"], clean, ctx_lens))
    on_device = dict(zip(poisoned, on(device, *poisoned.values())))

    out = cascade_module.cascade_decode_attention_split(*cascade_args(on_device, query.to(device), 0.125),
                                                        num_splits=splits, node_splits=node_splits)

    assert_close(out, reference.cascade_decode_attention(*cascade_args(args, query, 0.125)), TOL[dtype])
    no_node = (args["seq_group"] < 0).view(len(ctx_lens), -1).all(1)
    decode = decode_attention.paged_decode_attention_split(
        query[no_node].to(device), on_device["k_cache"], on_device["v_cache"], clean[no_node].to(device),
        on_device["context_lens"][no_node.to(device)], 0.125, num_splits=splits)
    assert torch.equal(out.cpu()[no_node], decode.cpu())


# ----------------------------------------------------------------------------- data movement


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,kv_heads,head_dim", [(1, 1, 64), (7, 3, 64), (33, 2, 128)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv(device, dtype, num_tokens, kv_heads, head_dim, slot_dtype):
    key, value, k_cache, v_cache, slots = store_kv_inputs(num_tokens, kv_heads, head_dim, dtype, slot_dtype)
    k_out, v_out = on(device, k_cache, v_cache)

    store_kv.store_kv(*on(device, key, value), k_out, v_out, slots.to(device))

    reference.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_out.cpu(), k_cache) and torch.equal(v_out.cpu(), v_cache)


def test_store_kv_strided_and_converted_inputs(device):
    """Keys sliced out of a fused QKV projection, and float32 values into a bfloat16 cache."""
    qkv = torch.randn(10, 5, 64)
    key, value = qkv[:, 3:4], qkv[:, 4:5].clone()
    k_cache = torch.zeros(4, BLOCK, 1, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 17, 63, 20, 21, 22, -1, 1])
    qkv_dev, k_out, v_out = on(device, qkv, k_cache, v_cache)

    store_kv.store_kv(qkv_dev[:, 3:4], qkv_dev[:, 4:5], k_out, v_out, slots.to(device))

    reference.store_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_out.cpu(), k_cache) and torch.equal(v_out.cpu(), v_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers,src,dst", COPY_BLOCKS_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_copy_blocks(device, dtype, layers, src, dst, index_dtype):
    kv_cache = torch.randn(2, layers, 12, BLOCK, 3, 64).to(dtype)
    src_t, dst_t = torch.tensor(src, dtype=index_dtype), torch.tensor(dst, dtype=index_dtype)
    (out,) = on(device, kv_cache)

    copy_blocks_module.copy_blocks(out, *on(device, src_t, dst_t))

    reference.copy_blocks(kv_cache, src_t, dst_t)
    assert torch.equal(out.cpu(), kv_cache)


# ----------------------------------------------------------------------------- prm_step_score


def prm_inputs(num_rows, width, rows, dtype, count_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = (3 * torch.randn(num_rows, width, generator=gen)).to(dtype)
    norm_weight = (0.5 + torch.rand(width, generator=gen)).to(dtype)
    # LM-head-like rows: logits of a few units, where the probability is informative.
    head_weight = (torch.randn(rows, width, generator=gen) * width**-0.5).to(dtype)
    head_bias = torch.randn(rows, generator=gen).to(dtype)
    prev_agg = torch.rand(num_rows, generator=gen)
    prev_count = torch.arange(num_rows, dtype=count_dtype) % 4  # 0: the beam's first step
    return hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(
    "rows,positive_index,use_norm,use_bias",
    [(2, 1, True, False), (2, 0, True, True), (1, 0, False, True), (1, 0, True, False)],
    ids=["two-rows-pos1-norm", "two-rows-pos0-norm-bias", "value-head-bias", "value-head-norm"],
)
@pytest.mark.parametrize("dtype,width", [(torch.float32, 576), (torch.bfloat16, 576), (torch.float32, 1500)])
def test_prm_step_score(device, aggregation, rows, positive_index, use_norm, use_bias, dtype, width):
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        7, width, rows, dtype, torch.int64 if use_bias else torch.int32, seed=rows + width
    )
    norm_weight = norm_weight if use_norm else None
    head_bias = head_bias if use_bias else None
    args = (hidden, norm_weight, 1e-5, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]

    scores, aggregates = prm_step_score.prm_step_score(*on_device)

    expected_scores, expected_aggregates = reference.prm_step_score(*args)
    assert_close(scores, expected_scores, TOL[dtype])
    assert_close(aggregates, expected_aggregates, TOL[dtype])
    assert scores.data_ptr() != aggregates.data_ptr()


def test_prm_step_score_strided_hidden_and_empty(device):
    hidden, norm_weight, head_weight, _, prev_agg, prev_count = prm_inputs(5, 64, 2, torch.float32, torch.int32, 0)
    wide = torch.randn(5, 3 * 64)
    wide[:, 64:128] = hidden
    args = (norm_weight, 1e-6, head_weight, None, 1, prev_agg, prev_count, "min")
    wide_dev = wide.to(device)
    scores, aggregates = prm_step_score.prm_step_score(
        wide_dev[:, 64:128], *[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    )
    expected = reference.prm_step_score(wide[:, 64:128], *args)
    assert_close(scores, expected[0], TOL[torch.float32])
    assert_close(aggregates, expected[1], TOL[torch.float32])

    empty = torch.empty(0, device=device)
    scores, aggregates = prm_step_score.prm_step_score(
        torch.empty(0, 64, device=device), None, 1e-6, head_weight.to(device), None, 0, empty,
        torch.empty(0, dtype=torch.int32, device=device), "last",
    )
    assert scores.shape == aggregates.shape == (0,)


# ----------------------------------------------------------------------------- registration


def test_register_cuda_registers_every_op_with_its_schema_arguments():
    calls = []

    class Recorder:
        def impl(self, name, fn, key):
            calls.append((name, fn, key))

    register_cuda(Recorder())

    assert sorted(name for name, _, _ in calls) == sorted(registry.SCHEMAS)
    for name, fn, key in calls:
        assert key == "CUDA"
        schema = torch._C.parse_schema(registry.SCHEMAS[name])
        assert list(inspect.signature(fn).parameters) == [arg.name for arg in schema.arguments], name
        assert fn is LAUNCHERS[name]
