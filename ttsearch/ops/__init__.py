"""The op registry: every ttsearch op is defined here once.

Each op has a torch.library schema under the ``ttsearch`` namespace and a pure-torch
reference body (``ttsearch.ops.reference``) registered as the device-generic kernel.
Fast implementations register the same op name for one dispatch key each: the C++
extension ``ttsearch._C`` for CPU, the Triton kernels in ``ttsearch.kernels`` for CUDA.
The dispatcher then picks the implementation from the tensors' device, so call sites
never branch on the device.

``TTSEARCH_OPS`` chooses what is loaded:
  ``auto`` (default)  fast implementations where they load; one warning if the C++
                      extension is missing, then the reference serves the CPU.
  ``reference``       the reference bodies everywhere (debugging, and the tests' oracle).
  ``fast``            fast implementations required: failing to load one raises.

The public functions below validate their arguments (shapes, dtypes, devices, index
ranges) before dispatch, so no implementation ever sees a bad block table. The index
checks read tensor data; a model checks its host-side metadata once per forward with
``check_metadata`` and calls the ops with ``check_indices=False``, so on a GPU no layer
waits for a device-to-host copy.
"""

from __future__ import annotations

import os
import warnings

import torch

from ttsearch.ops import quantized, reference

_SCHEMAS = {
    "store_kv": "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    "paged_decode_attention": "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
    "cascade_decode_attention": "cascade_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, Tensor prefix_tables, Tensor prefix_lens, Tensor seq_group, float scale) -> Tensor",
    "paged_extend_attention": "paged_extend_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor",
    "copy_blocks": "copy_blocks(Tensor(a!) kv_cache, Tensor src, Tensor dst) -> ()",
    "prm_step_score": "prm_step_score(Tensor hidden, Tensor? norm_weight, float eps, Tensor head_weight, Tensor? head_bias, int positive_index, Tensor prev_agg, Tensor prev_count, str aggregation) -> (Tensor, Tensor)",
    "rms_norm": "rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float eps) -> ()",
    "fused_add_rms_norm": "fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()",
    "rotary_embedding": "rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()",
    "silu_and_mul": "silu_and_mul(Tensor(a!) out, Tensor input) -> ()",
    "sample_tokens": "sample_tokens(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor u) -> Tensor",
    "quantized_linear": "quantized_linear(Tensor x, Tensor blocks, str qtype) -> Tensor",
}

_LIB = torch.library.Library("ttsearch", "DEF")
for _name, _schema in _SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


@torch.library.register_fake("ttsearch::paged_decode_attention")
def _(query, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::cascade_decode_attention")
def _(query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::paged_extend_attention")
def _(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale):
    return torch.empty_like(query)


@torch.library.register_fake("ttsearch::store_kv")
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("ttsearch::copy_blocks")
def _(kv_cache, src, dst):
    return None


@torch.library.register_fake("ttsearch::prm_step_score")
def _(hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.register_fake("ttsearch::rms_norm")
def _(out, input, weight, eps):
    return None


@torch.library.register_fake("ttsearch::fused_add_rms_norm")
def _(input, residual, weight, eps):
    return None


@torch.library.register_fake("ttsearch::rotary_embedding")
def _(positions, query, key, cos_sin_cache):
    return None


@torch.library.register_fake("ttsearch::silu_and_mul")
def _(out, input):
    return None


@torch.library.register_fake("ttsearch::sample_tokens")
def _(logits, temperature, top_k, top_p, u):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


@torch.library.register_fake("ttsearch::quantized_linear")
def _(x, blocks, qtype):
    return x.new_empty(x.shape[0], blocks.shape[0])


#: attention ops take head_dim in multiples of one AVX-512 float vector
HEAD_DIM_MULTIPLE = 16

MODE = os.environ.get("TTSEARCH_OPS", "auto")
if MODE not in ("auto", "reference", "fast"):
    raise ValueError(f"TTSEARCH_OPS={MODE!r}: expected one of 'auto', 'reference', 'fast'")

#: which implementation serves each device, for reports and benchmarks
IMPLEMENTATIONS: dict[str, str] = {"cpu": "reference", "cuda": "reference"}


def _load_fast_implementations() -> None:
    if MODE == "reference":
        return
    try:
        from ttsearch import _cpu_isa

        # imports the one ttsearch._C_<level> for this CPU (or TTSEARCH_CPU_ISA), which
        # registers its CPU kernels; a forced level it cannot load raises ValueError, never falls back
        IMPLEMENTATIONS["cpu"] = f"cpp-{_cpu_isa.load()}"
    except ImportError as exc:
        if MODE == "fast":
            raise ImportError(f"TTSEARCH_OPS=fast but the C++ extension ttsearch._C_<isa> did not load: {exc}") from exc
        warnings.warn(
            f"the C++ extension ttsearch._C_<isa> is not built ({exc}); CPU ops run on the pure-torch reference. "
            "Reinstall with a C++ compiler to build it.",
            stacklevel=3,
        )
    if torch.cuda.is_available():
        try:
            from ttsearch.kernels.registration import register_cuda  # registers the Triton kernels

            register_cuda(_LIB)
            IMPLEMENTATIONS["cuda"] = "triton"
        except ImportError as exc:
            if MODE == "fast":
                raise ImportError(f"TTSEARCH_OPS=fast but the Triton kernels did not load: {exc}") from exc
            warnings.warn(f"Triton kernels unavailable ({exc}); CUDA ops run on the reference.", stacklevel=3)


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_cache(name: str, cache: torch.Tensor, device: torch.device) -> None:
    _check(cache.dim() == 4, f"{name}: expected [num_blocks, block_size, kv_heads, head_dim], got shape {tuple(cache.shape)}")
    _check(cache.device == device, f"{name} is on {cache.device}, the query on {device}")


def _check_int(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    _check(t.dim() == dim, f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    _check(t.dtype in (torch.int32, torch.int64), f"{name}: expected int32 or int64, got {t.dtype}")
    _check(t.device == device, f"{name} is on {t.device}, the data on {device}")


def _check_block_table_indices(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                               block_size: int) -> None:
    _check(block_tables.shape[0] == context_lens.shape[0],
           f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if context_lens.numel() == 0:
        return
    _check(bool((context_lens >= 1).all()), f"context_lens must be >= 1, got min {int(context_lens.min())}")
    needed = (context_lens + block_size - 1) // block_size
    _check(int(needed.max()) <= block_tables.shape[1],
           f"a context of {int(context_lens.max())} tokens needs {int(needed.max())} blocks; "
           f"block_tables has {block_tables.shape[1]} columns")
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < needed[:, None]
    ids = block_tables[used]
    bad = (ids < 0) | (ids >= num_blocks)
    if bool(bad.any()):
        raise ValueError(f"block id {int(ids[bad][0])} out of range [0, {num_blocks}) in block_tables")


def _check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel():
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        _check(lo >= -1 and hi < num_slots, f"slot out of range: slots span [{lo}, {hi}], the pool has {num_slots}")


def _check_query_starts(query_start_loc: torch.Tensor, context_lens: torch.Tensor, num_tokens: int) -> None:
    q_lens = query_start_loc.diff()
    _check(int(query_start_loc[0]) == 0 and int(query_start_loc[-1]) == num_tokens and bool((q_lens >= 0).all()),
           f"query_start_loc must rise from 0 to {num_tokens}, got {query_start_loc.tolist()[:8]}...")
    _check(bool((q_lens <= context_lens).all()), "a sequence has more new tokens than its context length")


def check_metadata(
    num_blocks: int,
    block_size: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    slot_mapping: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
    prefix_tables: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,
    seq_group: torch.Tensor | None = None,
) -> None:
    """Check the index metadata of one forward against a pool of ``num_blocks`` blocks of
    ``block_size`` tokens: the range checks that the ops skip with ``check_indices=False``.

    Pass host (CPU) tensors: they are read here, once, and a model then runs every layer's
    ops on their device copies without reading them back (on CUDA each read would be a
    host sync). ``query_start_loc`` describes an extend batch, the prefix tensors a
    cascade decode batch (see ``cascade_decode_attention``)."""
    for name, t, dim in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1)):
        _check_int(name, t, dim, block_tables.device)
    _check_block_table_indices(block_tables, context_lens, num_blocks, block_size)
    if slot_mapping is not None:
        _check_int("slot_mapping", slot_mapping, 1, block_tables.device)
        _check_slots(slot_mapping, num_blocks * block_size)
    if query_start_loc is not None:
        _check_int("query_start_loc", query_start_loc, 1, block_tables.device)
        _check(query_start_loc.shape[0] == context_lens.shape[0] + 1,
               f"query_start_loc needs {context_lens.shape[0] + 1} entries, got {query_start_loc.shape[0]}")
        num_tokens = slot_mapping.shape[0] if slot_mapping is not None else int(query_start_loc[-1])
        _check_query_starts(query_start_loc, context_lens, num_tokens)
    if prefix_tables is not None:
        for name, t, dim in (("prefix_tables", prefix_tables, 2), ("prefix_lens", prefix_lens, 1),
                             ("seq_group", seq_group, seq_group.dim() if seq_group is not None else 1)):
            _check(t is not None, f"{name} is missing: a cascade batch needs prefix_tables, prefix_lens and seq_group")
            _check_int(name, t, dim, block_tables.device)
        _check(prefix_tables.shape[0] == prefix_lens.shape[0],
               f"prefix_tables has {prefix_tables.shape[0]} rows but prefix_lens has {prefix_lens.shape[0]} groups")
        _check(seq_group.shape[0] == context_lens.shape[0],
               f"seq_group has {seq_group.shape[0]} entries for {context_lens.shape[0]} sequences")
        _check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, num_blocks, block_size)


def _check_attention(query, k_cache, v_cache, scale) -> None:
    _check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check_cache("k_cache", k_cache, query.device)
    _check(query.dim() == 3, f"query: expected [tokens, heads, head_dim], got shape {tuple(query.shape)}")
    _check(query.shape[2] == k_cache.shape[3], f"query head_dim {query.shape[2]} != cache head_dim {k_cache.shape[3]}")
    _check(query.shape[2] % HEAD_DIM_MULTIPLE == 0,
           f"head_dim {query.shape[2]} is not a multiple of {HEAD_DIM_MULTIPLE} (the vector width every implementation assumes)")
    _check(query.shape[1] % k_cache.shape[2] == 0,
           f"{query.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    _check(query.dtype == k_cache.dtype == v_cache.dtype,
           f"query dtype {query.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must match")
    _check(scale > 0, f"scale must be positive, got {scale}")


# ----------------------------------------------------------------------------- public ops


def store_kv(key, value, k_cache, v_cache, slot_mapping, *, check_indices: bool = True) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into their slots; slot -1 is skipped.

    ``check_indices=False`` (here and in every attention op): the caller checked the index
    tensors with ``check_metadata`` on the host; the op then reads no tensor data."""
    _check_cache("k_cache", k_cache, key.device)
    _check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check(key.shape == value.shape and key.dim() == 3 and key.shape[1:] == k_cache.shape[2:],
           f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match the cache's [*, {k_cache.shape[2]}, {k_cache.shape[3]}]")
    _check_int("slot_mapping", slot_mapping, 1, key.device)
    _check(slot_mapping.shape[0] == key.shape[0], f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens")
    if check_indices:
        _check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])
    torch.ops.ttsearch.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale: float, *,
                           check_indices: bool = True):
    """``query [B, H, D]`` (one token per sequence) against each sequence's paged context."""
    _check_attention(query, k_cache, v_cache, scale)
    _check_int("block_tables", block_tables, 2, query.device)
    _check_int("context_lens", context_lens, 1, query.device)
    _check(query.shape[0] == context_lens.shape[0], f"{query.shape[0]} queries but {context_lens.shape[0]} context lengths")
    _check(block_tables.shape[0] == context_lens.shape[0],
           f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if check_indices:
        _check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])
    return torch.ops.ttsearch.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)


def _check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, num_blocks: int,
                         block_size: int) -> None:
    """The nodes are whole, in-range blocks; each sequence's path is -1-padded, keeps every
    node at one level, fits its context, and its block table holds each node's blocks at
    the node's columns."""
    device = block_tables.device
    num_groups = prefix_lens.shape[0]
    if num_groups:
        bad = (prefix_lens < block_size) | (prefix_lens % block_size != 0)
        if bool(bad.any()):
            g = int(bad.nonzero()[0, 0])
            raise ValueError(f"prefix_lens[{g}] = {int(prefix_lens[g])}: a shared prefix must be whole blocks "
                             f"(a positive multiple of block_size {block_size})")
        prefix_blocks = prefix_lens // block_size
        _check(int(prefix_blocks.max()) <= prefix_tables.shape[1],
               f"a prefix of {int(prefix_lens.max())} tokens needs {int(prefix_blocks.max())} blocks; "
               f"prefix_tables has {prefix_tables.shape[1]} columns")
        used = torch.arange(prefix_tables.shape[1], device=device)[None, :] < prefix_blocks[:, None]
        ids = prefix_tables[used]
        bad = (ids < 0) | (ids >= num_blocks)
        if bool(bad.any()):
            raise ValueError(f"block id {int(ids[bad][0])} out of range [0, {num_blocks}) in prefix_tables")

    multi_level = seq_group.dim() == 2
    path = (seq_group if multi_level else seq_group[:, None]).long()  # [B, L]
    if path.numel() == 0:
        return

    def where(b: int, level: int) -> str:  # names an entry of seq_group
        return f"seq_group[{b}, {level}]" if multi_level else f"seq_group[{b}]"

    lo, hi = int(path.min()), int(path.max())
    if lo < -1 or hi >= num_groups:
        b, level = (int(x) for x in ((path < -1) | (path >= num_groups)).nonzero()[0])
        raise ValueError(f"seq_group spans [{lo}, {hi}]: expected -1 or a group in [0, {num_groups}); "
                         f"{where(b, level)} = {int(path[b, level])}")
    valid = path >= 0
    leading = valid.long().cumprod(1).bool()  # the entries before a row's first -1
    after_gap = valid[:, 1:] & ~leading[:, :-1]
    if bool(after_gap.any()):
        b, level = (int(x) for x in after_gap.nonzero()[0])
        raise ValueError(f"{where(b, level + 1)} = {int(path[b, level + 1])} follows a -1: "
                         f"a sequence's path lists its nodes first, then -1 padding")
    if not bool(valid.any()):
        return
    # Each node at one level on every path (so it is on a path at most once).
    members, levels = valid.nonzero(as_tuple=True)
    nodes = path[members, levels]
    first_level = torch.full((num_groups,), path.shape[1], dtype=torch.long, device=device)
    first_level = first_level.scatter_reduce(0, nodes, levels, "amin")
    moved = levels != first_level[nodes]
    if bool(moved.any()):
        i = int(moved.nonzero()[0, 0])
        b, level, g = int(members[i]), int(levels[i]), int(nodes[i])
        other = int(members[(nodes == g) & (levels == first_level[g])][0])
        raise ValueError(f"group {g} is at level {level} of sequence {b}'s path ({where(b, level)}) but at level "
                         f"{int(first_level[g])} of sequence {other}'s path: a prefix node keeps one level on every path")

    # Where each node starts in its members' contexts: after the nodes before it on the path.
    node_lens = torch.where(valid, prefix_lens.long()[path.clamp(min=0)], 0)
    ends = node_lens.cumsum(1)
    short = ends > context_lens.long()[:, None]
    if bool((short & valid).any()):
        b, level = (int(x) for x in (short & valid).nonzero()[0])
        g = int(path[b, level])
        at = f" at level {level}" if multi_level else ""
        raise ValueError(f"sequence {b} has {int(context_lens[b])} tokens, fewer than the {int(ends[b, level])}-token "
                         f"prefix of its group {g}{at}")

    # Column c < the path's blocks lies in the node at the first level whose end passes it.
    path_blocks = ends[:, -1] // block_size
    width = int(path_blocks.max())  # the tables cover it: a path fits its context
    cols = torch.arange(width, device=device).expand(path.shape[0], width)
    in_path = cols < path_blocks[:, None]
    level_of = torch.searchsorted((ends // block_size).contiguous(), cols.contiguous(), right=True)
    level_of = level_of.clamp(max=path.shape[1] - 1)
    node_of = path.gather(1, level_of).clamp(min=0)
    start_of = (ends - node_lens).gather(1, level_of) // block_size
    expected = prefix_tables.long()[node_of, (cols - start_of).clamp(0, prefix_tables.shape[1] - 1)]
    differ = (block_tables[:, :width].long() != expected) & in_path
    if bool(differ.any()):
        b, col = (int(x) for x in differ.nonzero()[0])
        level, g, start = int(level_of[b, col]), int(node_of[b, col]), int(start_of[b, col])
        end = start + int(prefix_lens[g]) // block_size
        where_node = "start with" if start == 0 else f"hold at columns [{start}, {end})"
        at = f" (level {level})" if multi_level else ""
        raise ValueError(f"sequence {b}'s block table does not {where_node} the prefix blocks of its group {g}{at}: "
                         f"column {col} holds block {int(block_tables[b, col])}, the prefix block "
                         f"{int(prefix_tables[g, col - start])}")


def cascade_decode_attention(
    query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale: float, *,
    check_indices: bool = True,
):
    """Decode attention that reads each shared prefix node once for all the sequences below it.

    The result is ``paged_decode_attention(query, k_cache, v_cache, block_tables,
    context_lens, scale)``; the extra arguments describe a tree of shared prefixes:

    - ``prefix_tables [G, W]``, ``prefix_lens [G]``: node (group) ``g`` holds
      ``prefix_lens[g]`` tokens, whole blocks (a multiple of block_size, at least one
      block), in ``prefix_tables[g, :prefix_lens[g] // block_size]``;
    - ``seq_group [B, L]``: row ``b`` lists the nodes on sequence ``b``'s path, outermost
      first, then -1 padding (never a node after a -1). Or ``seq_group [B]``: one node per
      sequence, or -1 for none (the one-level case, L = 1).

    The nodes on ``b``'s path tile the start of its context in order: the node at level
    ``l`` covers tokens ``[start, start + prefix_lens[g])``, ``start`` the sum of
    ``prefix_lens`` of the nodes before it, and ``b``'s block table holds exactly that
    node's blocks at those columns. The path must fit the context: the sum of its
    ``prefix_lens`` is at most ``context_lens[b]`` (equal is allowed: ``b`` then has no
    tokens of its own). A node is at the same level on every path that holds it (its
    members are the sequences below it in the tree); it may have one member or none.
    Anything else raises ValueError naming the sequence, level, node and column.
    """
    _check_attention(query, k_cache, v_cache, scale)
    device = query.device
    for name, t, dim in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1),
                         ("prefix_tables", prefix_tables, 2), ("prefix_lens", prefix_lens, 1)):
        _check_int(name, t, dim, device)
    _check(seq_group.dim() in (1, 2), f"seq_group: expected [B] or [B, L], got shape {tuple(seq_group.shape)}")
    _check_int("seq_group", seq_group, seq_group.dim(), device)
    batch, num_groups = query.shape[0], prefix_lens.shape[0]
    _check(context_lens.shape[0] == batch, f"{batch} queries but {context_lens.shape[0]} context lengths")
    _check(seq_group.shape[0] == batch, f"seq_group has {seq_group.shape[0]} entries for {batch} sequences")
    _check(prefix_tables.shape[0] == num_groups,
           f"prefix_tables has {prefix_tables.shape[0]} rows but prefix_lens has {num_groups} groups")
    _check(block_tables.shape[0] == batch, f"block_tables has {block_tables.shape[0]} rows for {batch} sequences")
    if check_indices:
        _check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])
        if batch:
            _check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, *k_cache.shape[:2])
    return torch.ops.ttsearch.cascade_decode_attention(
        query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale
    )


def paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale: float, *,
                           check_indices: bool = True):
    """New tokens ``query [T, H, D]`` of several sequences, causal among themselves, against
    each sequence's paged context (which already holds their keys and values)."""
    _check_attention(query, k_cache, v_cache, scale)
    _check_int("block_tables", block_tables, 2, query.device)
    _check_int("context_lens", context_lens, 1, query.device)
    _check_int("query_start_loc", query_start_loc, 1, query.device)
    _check(query_start_loc.shape[0] == context_lens.shape[0] + 1,
           f"query_start_loc needs {context_lens.shape[0] + 1} entries, got {query_start_loc.shape[0]}")
    _check(block_tables.shape[0] == context_lens.shape[0],
           f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if check_indices:
        _check_query_starts(query_start_loc, context_lens, query.shape[0])
        _check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])
    return torch.ops.ttsearch.paged_extend_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
    )


def check_block_copies(num_blocks: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """The range checks ``copy_blocks`` skips with ``check_indices=False``; pass host tensors."""
    _check(src.shape == dst.shape, f"src has {src.numel()} blocks, dst {dst.numel()}")
    if src.numel():
        both = torch.cat([src, dst])
        _check(int(both.min()) >= 0 and int(both.max()) < num_blocks,
               f"block id out of range [0, {num_blocks}) in copy_blocks")
        _check(len(set(dst.tolist())) == dst.numel(), "copy_blocks: a destination block appears twice")


def copy_blocks(kv_cache, src, dst, *, check_indices: bool = True) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer of ``kv_cache [2, L, NB, BS, Hkv, D]``."""
    _check(kv_cache.dim() == 6, f"kv_cache: expected [2, layers, blocks, block_size, kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    _check_int("src", src, 1, kv_cache.device)
    _check_int("dst", dst, 1, kv_cache.device)
    _check(src.shape == dst.shape, f"src has {src.numel()} blocks, dst {dst.numel()}")
    if check_indices:
        check_block_copies(kv_cache.shape[2], src, dst)
    torch.ops.ttsearch.copy_blocks(kv_cache, src, dst)


def prm_step_score(
    hidden, norm_weight, eps: float, head_weight, head_bias, positive_index: int, prev_agg, prev_count, aggregation: str
):
    """P(good) per tag from hidden states at the tags ``[N, hidden]`` (final norm, then only
    the head's 1 or 2 rows), and each beam's running aggregate. See the reference body."""
    n, width = hidden.shape if hidden.dim() == 2 else (None, None)
    _check(hidden.dim() == 2, f"hidden: expected [tags, hidden], got shape {tuple(hidden.shape)}")
    _check(head_weight.dim() == 2 and head_weight.shape[0] in (1, 2) and head_weight.shape[1] == width,
           f"head_weight: expected [1 or 2, {width}], got shape {tuple(head_weight.shape)}")
    _check(norm_weight is None or tuple(norm_weight.shape) == (width,),
           f"norm_weight: expected [{width}], got shape {tuple(norm_weight.shape) if norm_weight is not None else None}")
    _check(head_bias is None or tuple(head_bias.shape) == (head_weight.shape[0],),
           f"head_bias: expected [{head_weight.shape[0]}]")
    _check(head_weight.shape[0] == 1 or positive_index in (0, 1), f"positive_index must be 0 or 1, got {positive_index}")
    _check(aggregation in reference.AGGREGATIONS, f"aggregation={aggregation!r}: expected one of {reference.AGGREGATIONS}")
    _check(tuple(prev_agg.shape) == (n,) and prev_agg.dtype == torch.float32,
           f"prev_agg: expected float32 [{n}], got {prev_agg.dtype} {tuple(prev_agg.shape)}")
    _check_int("prev_count", prev_count, 1, hidden.device)
    _check(prev_count.shape[0] == n, f"prev_count has {prev_count.shape[0]} entries for {n} tags")
    for name, t in (("norm_weight", norm_weight), ("head_weight", head_weight), ("head_bias", head_bias), ("prev_agg", prev_agg)):
        _check(t is None or t.device == hidden.device, f"{name} is on {t.device if t is not None else None}, hidden on {hidden.device}")
    return torch.ops.ttsearch.prm_step_score(
        hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation
    )


# ----------------------------------------------------------------------------- fused elementwise ops
# These run several times per layer, so their checks compare shapes, dtypes and devices
# only; tensor data is read only for rotary positions (check_indices) and sampling settings
# (check_values).

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_like(name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    _check(tuple(t.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    _check(t.dtype == like.dtype and t.device == like.device,
           f"{name}: {t.dtype} on {t.device}, expected {like.dtype} on {like.device}")


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t [..., width]`` as a 2-D view ``[rows, width]`` with a unit last stride; never a copy,
    since the in-place ops write through it."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError as exc:
        raise ValueError(f"{name}: shape {tuple(t.shape)} with strides {t.stride()} is not viewable as rows") from exc
    _check(rows.shape[1] <= 1 or rows.stride(1) == 1,
           f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    return rows


def _check_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    _check(x.dtype in _FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 input, got {x.dtype}")
    _check(x.dim() >= 1, "x: expected [..., hidden], got a scalar")
    _check_like("weight", weight, (x.shape[-1],), x)
    _check(weight.is_contiguous(), "weight must be contiguous")
    _check(eps >= 0, f"eps must be >= 0, got {eps}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rms_norm(x) * weight`` over the last dim (normalized in float32, rounded to x's dtype,
    then scaled), into ``out`` (new if None); returns ``out``."""
    _check_norm(x, weight, eps)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_like("out", out, x.shape, x)
    x_rows = x.reshape(-1, x.shape[-1])
    if x_rows.shape[1] > 1 and x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    torch.ops.ttsearch.rms_norm(_rows("out", out), x_rows, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place, in one pass: ``residual += x``, then ``x = rms_norm(residual) * weight``."""
    _check_norm(x, weight, eps)
    _check_like("residual", residual, x.shape, x)
    torch.ops.ttsearch.fused_add_rms_norm(_rows("x", x), _rows("residual", residual), weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     *, check_indices: bool = True) -> None:
    """Rotate-half (GPT-NeoX) RoPE in place on ``query [T, H, D]`` and ``key [T, Hkv, D]``
    (views into a fused qkv output are fine: any token stride, each token's heads
    contiguous). Row ``p`` of ``cos_sin_cache [max_pos, D]`` is cos, then sin, of
    ``p * inv_freq`` (D/2 each), in the query's dtype."""
    _check(query.dim() == 3 and key.dim() == 3,
           f"query {tuple(query.shape)} and key {tuple(key.shape)}: expected [tokens, heads, head_dim]")
    tokens, _, dim = query.shape
    _check(query.dtype in _FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 query, got {query.dtype}")
    _check(dim % 2 == 0, f"head_dim {dim} is odd")
    _check_like("key", key, (tokens, key.shape[1], dim), query)
    for name, t in (("query", query), ("key", key)):
        _check(t.numel() == 0 or (t.stride(2) == 1 and t.stride(1) == dim),
               f"{name}: each token's heads must be contiguous, got strides {t.stride()}")
    _check_like("cos_sin_cache", cos_sin_cache, (cos_sin_cache.shape[0], dim), query)
    _check(cos_sin_cache.is_contiguous(), "cos_sin_cache must be contiguous")
    _check_int("positions", positions, 1, query.device)
    _check(positions.shape[0] == tokens, f"{positions.shape[0]} positions for {tokens} tokens")
    if check_indices and tokens:
        lo, hi = int(positions.min()), int(positions.max())
        _check(lo >= 0 and hi < cos_sin_cache.shape[0],
               f"positions span [{lo}, {hi}]; cos_sin_cache has {cos_sin_cache.shape[0]} rows")
    torch.ops.ttsearch.rotary_embedding(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (gate, then up), into ``out``
    (new if None); returns ``out``."""
    _check(x.dtype in _FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 input, got {x.dtype}")
    _check(x.dim() >= 1 and x.shape[-1] % 2 == 0, f"x: expected [..., 2d], got shape {tuple(x.shape)}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _check_like("out", out, shape, x)
    x_rows = x.reshape(-1, x.shape[-1])
    if x_rows.shape[1] > 1 and x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    torch.ops.ttsearch.silu_and_mul(_rows("out", out), x_rows)
    return out


def check_sampling_values(temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          u: torch.Tensor) -> None:
    """The value checks ``sample_tokens`` skips with ``check_values=False``; pass the host
    tensors the device copies are made from (on a GPU, reading these is a host sync)."""
    if temperature.numel():
        _check(bool(((temperature >= 0) & (top_k >= 0) & (top_p > 0) & (top_p <= 1) & (u >= 0) & (u < 1)).all()),
               "expected temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= u < 1 in every row")


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (float32, or bfloat16 / float16 widened to float32)
    -> int64 ``[B]``: per row a temperature (0: greedy), ``top_k`` (0: off, 1: greedy),
    ``top_p`` in (0, 1] (1: off) and one uniform draw ``u`` in [0, 1).
    ``reference.sample_tokens`` states the rule exactly. ``check_values=False``: the caller
    checked the settings on the host with ``check_sampling_values``; nothing is read here."""
    _check(logits.dim() == 2 and logits.dtype in _FLOAT_DTYPES,
           f"logits: expected float32, bfloat16 or float16 [batch, vocab], got {logits.dtype} {tuple(logits.shape)}")
    _check(logits.shape[1] > 0, "logits: the vocabulary is empty")
    batch = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_p", top_p), ("u", u)):
        _check(tuple(t.shape) == (batch,) and t.dtype == torch.float32,
               f"{name}: expected float32 [{batch}], got {t.dtype} {tuple(t.shape)}")
        _check(t.device == logits.device, f"{name} is on {t.device}, logits on {logits.device}")
    _check_int("top_k", top_k, 1, logits.device)
    _check(top_k.shape[0] == batch, f"top_k has {top_k.shape[0]} entries for {batch} rows")
    if check_values:
        check_sampling_values(temperature, top_k, top_p, u)
    return torch.ops.ttsearch.sample_tokens(logits, temperature, top_k, top_p, u)


_load_fast_implementations()

__all__ = [
    "store_kv",
    "paged_decode_attention",
    "paged_extend_attention",
    "cascade_decode_attention",
    "copy_blocks",
    "prm_step_score",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "sample_tokens",
    "check_metadata",
    "check_block_copies",
    "check_sampling_values",
    "reference",
    "IMPLEMENTATIONS",
    "MODE",
]


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x [..., K] @ W.T`` for a weight ``W [N, K]`` kept in GGUF's quantized blocks ``blocks
    [N, K / block_elems * block_bytes]`` (uint8, ``ttsearch.ops.quantized`` has the layouts)
    -> ``[..., N]`` in x's dtype. x is taken rounded to int8 in groups of 32 features, as
    llama.cpp takes it (``quantized.round_groups``)."""
    _check(qtype in quantized.FORMATS, f"qtype {qtype!r}: expected one of {', '.join(quantized.FORMATS)}")
    fmt = quantized.FORMATS[qtype]
    _check(blocks.dim() == 2 and blocks.dtype == torch.uint8 and blocks.shape[1] % fmt.bytes == 0,
           f"blocks: expected uint8 [out_features, a multiple of {fmt.bytes} bytes] for {qtype}, "
           f"got {blocks.dtype} {tuple(blocks.shape)}")
    _check(blocks.is_contiguous() and blocks.device == x.device, "blocks must be contiguous and on x's device")
    _check(x.dtype in _FLOAT_DTYPES, f"x: expected a float32, bfloat16 or float16 input, got {x.dtype}")
    k = quantized.in_features(qtype, blocks)
    _check(x.dim() >= 1 and x.shape[-1] == k, f"x: expected [..., {k}] for these {qtype} blocks, got {tuple(x.shape)}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) != k):
        rows = rows.contiguous()
    return torch.ops.ttsearch.quantized_linear(rows, blocks, qtype).reshape(*x.shape[:-1], blocks.shape[0])
