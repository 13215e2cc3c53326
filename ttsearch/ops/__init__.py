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
ranges) before dispatch, so no implementation ever sees a bad block table.
"""

from __future__ import annotations

import os
import warnings

import torch

from ttsearch.ops import reference

_SCHEMAS = {
    "store_kv": "store_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    "paged_decode_attention": "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
    "cascade_decode_attention": "cascade_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, Tensor prefix_tables, Tensor prefix_lens, Tensor seq_group, float scale) -> Tensor",
    "paged_extend_attention": "paged_extend_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start_loc, Tensor context_lens, float scale) -> Tensor",
    "copy_blocks": "copy_blocks(Tensor(a!) kv_cache, Tensor src, Tensor dst) -> ()",
    "prm_step_score": "prm_step_score(Tensor hidden, Tensor? norm_weight, float eps, Tensor head_weight, Tensor? head_bias, int positive_index, Tensor prev_agg, Tensor prev_count, str aggregation) -> (Tensor, Tensor)",
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
        from ttsearch import _C  # noqa: F401  (registers the CPU kernels on import)

        IMPLEMENTATIONS["cpu"] = "cpp"
    except ImportError as exc:
        if MODE == "fast":
            raise ImportError(f"TTSEARCH_OPS=fast but the C++ extension ttsearch._C did not load: {exc}") from exc
        warnings.warn(
            f"ttsearch._C is not built ({exc}); CPU ops run on the pure-torch reference. "
            "Reinstall with a C++ compiler to build it.",
            stacklevel=3,
        )
    if torch.cuda.is_available():
        try:
            from ttsearch.kernels import register_cuda  # registers the Triton kernels

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


# A model calls each attention op once per layer with the same metadata tensors, so their
# index checks run once: the last checked tensors are remembered with their in-place
# version counters (any write to them invalidates the memo) and the pool's shape.
_LAST_CHECKED: dict[str, tuple] = {}


def _check_once(what: str, tensors: tuple, cache: torch.Tensor, check) -> None:
    """Run ``check(*tensors, cache)`` unless these very tensors, unmodified, passed it last time."""
    key = tuple((t, t._version) for t in tensors) + (tuple(cache.shape),)
    last = _LAST_CHECKED.get(what)
    if (last is not None and len(last) == len(key) and last[-1] == key[-1]
            and all(a is b and va == vb for (a, va), (b, vb) in zip(last[:-1], key[:-1]))):
        return
    _LAST_CHECKED.pop(what, None)
    check(*tensors, cache)
    _LAST_CHECKED[what] = key


def _check_block_tables(block_tables: torch.Tensor, context_lens: torch.Tensor, k_cache: torch.Tensor) -> None:
    _check_once("block_tables", (block_tables, context_lens), k_cache, _check_block_tables_now)


def _check_block_tables_now(block_tables: torch.Tensor, context_lens: torch.Tensor, k_cache: torch.Tensor) -> None:
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
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


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into their slots; slot -1 is skipped."""
    _check_cache("k_cache", k_cache, key.device)
    _check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    _check(key.shape == value.shape and key.dim() == 3 and key.shape[1:] == k_cache.shape[2:],
           f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match the cache's [*, {k_cache.shape[2]}, {k_cache.shape[3]}]")
    _check_int("slot_mapping", slot_mapping, 1, key.device)
    _check(slot_mapping.shape[0] == key.shape[0], f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens")
    if slot_mapping.numel():
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        _check(lo >= -1 and hi < num_slots, f"slot out of range: slots span [{lo}, {hi}], the pool has {num_slots}")
    torch.ops.ttsearch.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale: float):
    """``query [B, H, D]`` (one token per sequence) against each sequence's paged context."""
    _check_attention(query, k_cache, v_cache, scale)
    _check_int("block_tables", block_tables, 2, query.device)
    _check_int("context_lens", context_lens, 1, query.device)
    _check(query.shape[0] == context_lens.shape[0], f"{query.shape[0]} queries but {context_lens.shape[0]} context lengths")
    _check_block_tables(block_tables, context_lens, k_cache)
    return torch.ops.ttsearch.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)


def _check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, k_cache) -> None:
    """The nodes are whole, in-range blocks; each sequence's path is -1-padded, keeps every
    node at one level, fits its context, and its block table holds each node's blocks at
    the node's columns."""
    device = block_tables.device
    num_groups = prefix_lens.shape[0]
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
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
    query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale: float
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
    _check_block_tables(block_tables, context_lens, k_cache)
    if batch == 0:
        return torch.ops.ttsearch.cascade_decode_attention(
            query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale)

    _check_once("prefix_groups", (block_tables, context_lens, prefix_tables, prefix_lens, seq_group), k_cache,
                _check_prefix_groups)
    return torch.ops.ttsearch.cascade_decode_attention(
        query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale
    )


def paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale: float):
    """New tokens ``query [T, H, D]`` of several sequences, causal among themselves, against
    each sequence's paged context (which already holds their keys and values)."""
    _check_attention(query, k_cache, v_cache, scale)
    _check_int("block_tables", block_tables, 2, query.device)
    _check_int("context_lens", context_lens, 1, query.device)
    _check_int("query_start_loc", query_start_loc, 1, query.device)
    _check(query_start_loc.shape[0] == context_lens.shape[0] + 1,
           f"query_start_loc needs {context_lens.shape[0] + 1} entries, got {query_start_loc.shape[0]}")
    q_lens = query_start_loc.diff()
    _check(int(query_start_loc[0]) == 0 and int(query_start_loc[-1]) == query.shape[0] and bool((q_lens >= 0).all()),
           f"query_start_loc must rise from 0 to {query.shape[0]}, got {query_start_loc.tolist()[:8]}...")
    _check(bool((q_lens <= context_lens).all()), "a sequence has more new tokens than its context length")
    _check_block_tables(block_tables, context_lens, k_cache)
    return torch.ops.ttsearch.paged_extend_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
    )


def copy_blocks(kv_cache, src, dst) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer of ``kv_cache [2, L, NB, BS, Hkv, D]``."""
    _check(kv_cache.dim() == 6, f"kv_cache: expected [2, layers, blocks, block_size, kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    _check_int("src", src, 1, kv_cache.device)
    _check_int("dst", dst, 1, kv_cache.device)
    _check(src.shape == dst.shape, f"src has {src.numel()} blocks, dst {dst.numel()}")
    if src.numel():
        n = kv_cache.shape[2]
        both = torch.cat([src, dst])
        _check(int(both.min()) >= 0 and int(both.max()) < n, f"block id out of range [0, {n}) in copy_blocks")
        _check(len(set(dst.tolist())) == dst.numel(), "copy_blocks: a destination block appears twice")
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


_load_fast_implementations()

__all__ = [
    "store_kv",
    "paged_decode_attention",
    "paged_extend_attention",
    "cascade_decode_attention",
    "copy_blocks",
    "prm_step_score",
    "reference",
    "IMPLEMENTATIONS",
    "MODE",
]
