"""What the op tests share: inputs, oracles, and the harnesses of each implementation.

The op tests (``tests/test_ops_<family>.py``, one file per op family) run every
implementation of an op against an oracle:

- ``reference``: the pure-torch bodies in ``ttsearch.ops.reference``, against float64
  loops written here;
- ``cpp``: the dispatched public op, served by ``ttsearch._C_<isa>`` on the CPU, against the
  reference bodies called directly;
- ``triton``: the launchers in ``ttsearch.kernels``, called directly (not through the
  dispatcher): on CPU tensors through Triton's interpreter (the ``device`` fixture's
  ``cpu``), natively on a CUDA machine (``cuda``), against the reference bodies on the CPU.

Data movement must be exact; attention and scores within TOL. ``tests/test_isa.py`` runs
the same checks on every CPU ISA level's module.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

# Triton fixes a function's mode (interpreted or compiled) when it is decorated, so the
# interpreter must be on before triton is first imported. Anything that imported triton
# earlier in the session is handled by ``interpret``; a CUDA machine keeps native kernels.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ttsearch.ops as ops  # noqa: E402
from ttsearch.ops import reference  # noqa: E402

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(ImportError):  # imported by Triton's first launch; needs compiled functions
        import triton.experimental.gluon  # noqa: F401
    from ttsearch.kernels import activation as activation_module
    from ttsearch.kernels import cascade_decode_attention as cascade_module
    from ttsearch.kernels import copy_blocks as copy_blocks_module
    from ttsearch.kernels import decode_attention, extend_attention, split_kv
    from ttsearch.kernels import prm_step_score as prm_module
    from ttsearch.kernels import quantized_linear as quantized_linear_module
    from ttsearch.kernels import rms_norm as rms_norm_module
    from ttsearch.kernels import rotary as rotary_module
    from ttsearch.kernels import sampling as sampling_module
    from ttsearch.kernels import store_kv as store_kv_module
    from ttsearch.kernels.attention_tile import row_tile
    from ttsearch.kernels.compile_check import gpu_like
except ImportError:  # the tests that need these are skipped (``needs_triton``)
    triton = None
    activation_module = cascade_module = copy_blocks_module = decode_attention = extend_attention = split_kv = None
    prm_module = quantized_linear_module = rms_norm_module = rotary_module = sampling_module = store_kv_module = None
    row_tile = gpu_like = None

HAS_CPP = ops.IMPLEMENTATIONS["cpu"].startswith("cpp")  # "cpp-<isa level>"


NO_CPP = "ttsearch._C is not built (or TTSEARCH_OPS=reference): no C++ kernels to compare"


IMPLS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason=NO_CPP))]


cpp_only = pytest.mark.skipif(not HAS_CPP, reason=NO_CPP)
HAS_TRITON = triton is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable: no Triton kernels to test")

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


# ----------------------------------------------------------------------------- cascade inputs


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


# One level, and a tree with an unused node, for the poisoned-cache tests.
POISON_CASES = {
    "one-level": ([(5, [1, 17, 16, 0, 3]), (1, [15, 1])], [300, 2]),
    "tree": ([(2, [(1, [0, 17, (1, [16, 1])]), (3, [15, 0]), (1, [])]), (1, [1])], [300, 2]),
}


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


# ----------------------------------------------------------------------------- prm_step_score inputs


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


# ----------------------------------------------------------------------------- data movement inputs


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


COPY_BLOCKS_CASES = [
    (1, [0], [5]),
    (3, [1, 2, 3, 7], [8, 9, 10, 11]),
    (2, [4, 4, 0], [1, 2, 3]),  # one source, several destinations
    (2, [1, 2, 5], [2, 3, 1]),  # destinations that are also sources
    (1, [], []),
]


# ----------------------------------------------------------------------------- Triton launchers

if HAS_TRITON:
    #: every module whose Triton functions the interpreter takes over on a CPU
    KERNEL_MODULES = [store_kv_module, decode_attention, cascade_module, extend_attention, copy_blocks_module,
                      prm_module, split_kv, activation_module, rms_norm_module, rotary_module, sampling_module]
    LAUNCHERS = {
        "store_kv": store_kv_module.store_kv,
        "paged_decode_attention": decode_attention.paged_decode_attention,
        "cascade_decode_attention": cascade_module.cascade_decode_attention,
        "paged_extend_attention": extend_attention.paged_extend_attention,
        "copy_blocks": copy_blocks_module.copy_blocks,
        "prm_step_score": prm_module.prm_step_score,
        "rms_norm": rms_norm_module.rms_norm,
        "fused_add_rms_norm": rms_norm_module.fused_add_rms_norm,
        "rotary_embedding": rotary_module.rotary_embedding,
        "silu_and_mul": activation_module.silu_and_mul,
        "sample_tokens": sampling_module.sample_tokens,
        "quantized_linear": quantized_linear_module.quantized_linear,
    }
else:
    KERNEL_MODULES, LAUNCHERS = [], {}

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
#: the Triton launchers as implementations beside ``IMPLS``: on CPU tensors through the
#: interpreter, and natively on a CUDA machine
TRITON_IMPLS = [pytest.param(f"triton-{device}", marks=needs_triton) for device in DEVICES]


def interpret(monkeypatch) -> None:
    """Swap every compiled Triton function the kernels reach (theirs, and triton.language's
    own, such as tl.sum) for an interpreted twin for the duration of the test. (Triton
    imports triton.experimental.gluon at its first launch, and that import needs the
    compiled ones: it was imported above, before any swap.)"""
    for module in (tl, tl.standard, *KERNEL_MODULES):
        for name, fn in list(vars(module).items()):
            if isinstance(fn, JITFunction):
                monkeypatch.setattr(module, name, InterpretedFunction(fn.fn))


@pytest.fixture(params=[pytest.param(device, marks=needs_triton) for device in DEVICES])
def device(request, monkeypatch):
    """The device the Triton launchers run on: CPU tensors through the interpreter, CUDA natively."""
    if request.param == "cpu":
        interpret(monkeypatch)
    return torch.device(request.param)


def device_of(impl: str) -> torch.device:
    """Where ``impl``'s inputs live: a Triton launcher's device, else the CPU."""
    return torch.device(impl.partition("-")[2] if impl.startswith("triton-") else "cpu")


def launch(impl: str, name: str, monkeypatch):
    """Op ``name`` of ``impl`` and its oracle, as ``op_and_oracle``; a Triton launcher (its
    inputs on ``device_of(impl)``) against the reference body."""
    if not impl.startswith("triton-"):
        return op_and_oracle(impl, name)
    if device_of(impl).type == "cpu":
        interpret(monkeypatch)
    return LAUNCHERS[name], getattr(reference, name)


def on(device, *tensors):
    """Copies on ``device`` (never the CPU originals: those stay the reference's inputs)."""
    return [t.to(device, copy=True) for t in tensors]


def assert_within(actual, expected, tol):
    """A launcher's output (on any device) against the reference's on the CPU."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "NaN in the output"
    err = (actual.cpu().float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# Triton attention cases: per dtype, head dim and GQA shape.
ATTENTION_CASES = [
    pytest.param(dtype, head_dim, heads, id=f"{str(dtype)[6:]}-d{head_dim}-{heads}")
    for dtype in DTYPES
    for head_dim in (64, 128)
    for heads in HEADS
]


def cascade_inputs(groups, ungrouped, num_heads, kv_heads, head_dim, dtype, index_dtype=torch.int32, seed=0, **tree):
    args, clean, ctx_lens = make_cascade(groups, ungrouped, kv_heads, head_dim, dtype, index_dtype=index_dtype,
                                         seed=seed, **tree)
    query = torch.randn(len(ctx_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return args, clean, ctx_lens, query


# ----------------------------------------------------------------------------- fused elementwise ops and the sampler
# ``cpp``: the public op on CPU tensors, dispatched to ttsearch._C (skipped when it is not
# loaded; TTSEARCH_OPS=fast makes a missing extension an error instead). ``triton``: the
# launchers called directly, on CPU tensors through Triton's interpreter (kept small: it is
# slow) and natively on a CUDA machine. float32 within 1e-5, bf16/fp16 within a rounding
# step of the dtype (the rounding points are the reference's, the float32 sums' order is not).

FUSED_IMPLS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="ttsearch._C is not loaded")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")),
]
FUSED_DEVICE = "cuda" if HAS_CUDA else "cpu"
FUSED_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}  # (atol, rtol)
FUSED_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=FUSED_IMPLS, name="impl")
def fused_impl(request, monkeypatch):
    """The implementation under test: "cpp", or "triton" (interpreted on a CPU-only machine)."""
    if request.param == "triton" and not HAS_CUDA:
        interpret(monkeypatch)
    return request.param


def run_fused(impl: str, name: str, *args):
    """Op ``name`` on copies of ``args``: the C++ kernel through the dispatcher, or the Triton
    launcher directly (on the GPU where there is one). Returns the args (mutated) and the result."""
    device = "cpu" if impl == "cpp" else FUSED_DEVICE
    args = [a.to(device, copy=True) if isinstance(a, torch.Tensor) else a for a in args]
    out = getattr(torch.ops.ttsearch, name)(*args) if impl == "cpp" else LAUNCHERS[name](*args)
    back = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [back(a) for a in args], back(out)


def assert_fused_close(actual, expected):
    atol, rtol = FUSED_TOL[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
