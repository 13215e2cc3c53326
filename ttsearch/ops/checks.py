"""The argument checks of every op: shapes, dtypes, devices and index ranges.

``ttsearch.ops``' wrappers run ``check_<op>`` before dispatch, so no implementation ever sees
a bad block table. The index checks read tensor data; a model checks its host-side
metadata once per forward with ``check_metadata`` (and ``check_block_copies``,
``check_sampling_values``) and calls the ops with ``check_indices=False`` /
``check_values=False``, so on a GPU no layer waits for a device-to-host copy.
"""

from __future__ import annotations

import torch

from ttsearch.aggregation import AGGREGATIONS

#: attention ops take head_dim in multiples of one AVX-512 float vector
HEAD_DIM_MULTIPLE = 16

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_cache(name: str, cache: torch.Tensor, device: torch.device) -> None:
    check(cache.dim() == 4, f"{name}: expected [num_blocks, block_size, kv_heads, head_dim], got shape {tuple(cache.shape)}")
    check(cache.device == device, f"{name} is on {cache.device}, the query on {device}")


def check_int(name: str, t: torch.Tensor, dim: int, device: torch.device) -> None:
    check(t.dim() == dim, f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    check(t.dtype in (torch.int32, torch.int64), f"{name}: expected int32 or int64, got {t.dtype}")
    check(t.device == device, f"{name} is on {t.device}, the data on {device}")


def check_block_table_indices(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                               block_size: int) -> None:
    check(block_tables.shape[0] == context_lens.shape[0],
          f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if context_lens.numel() == 0:
        return
    check(bool((context_lens >= 1).all()), f"context_lens must be >= 1, got min {int(context_lens.min())}")
    needed = (context_lens + block_size - 1) // block_size
    check(int(needed.max()) <= block_tables.shape[1],
          f"a context of {int(context_lens.max())} tokens needs {int(needed.max())} blocks; "
           f"block_tables has {block_tables.shape[1]} columns")
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] < needed[:, None]
    ids = block_tables[used]
    bad = (ids < 0) | (ids >= num_blocks)
    if bool(bad.any()):
        raise ValueError(f"block id {int(ids[bad][0])} out of range [0, {num_blocks}) in block_tables")


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if slot_mapping.numel():
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        check(lo >= -1 and hi < num_slots, f"slot out of range: slots span [{lo}, {hi}], the pool has {num_slots}")


def check_query_starts(query_start_loc: torch.Tensor, context_lens: torch.Tensor, num_tokens: int) -> None:
    q_lens = query_start_loc.diff()
    check(int(query_start_loc[0]) == 0 and int(query_start_loc[-1]) == num_tokens and bool((q_lens >= 0).all()),
          f"query_start_loc must rise from 0 to {num_tokens}, got {query_start_loc.tolist()[:8]}...")
    check(bool((q_lens <= context_lens).all()), "a sequence has more new tokens than its context length")


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
        check_int(name, t, dim, block_tables.device)
    check_block_table_indices(block_tables, context_lens, num_blocks, block_size)
    if slot_mapping is not None:
        check_int("slot_mapping", slot_mapping, 1, block_tables.device)
        check_slots(slot_mapping, num_blocks * block_size)
    if query_start_loc is not None:
        check_int("query_start_loc", query_start_loc, 1, block_tables.device)
        check(query_start_loc.shape[0] == context_lens.shape[0] + 1,
              f"query_start_loc needs {context_lens.shape[0] + 1} entries, got {query_start_loc.shape[0]}")
        num_tokens = slot_mapping.shape[0] if slot_mapping is not None else int(query_start_loc[-1])
        check_query_starts(query_start_loc, context_lens, num_tokens)
    if prefix_tables is not None:
        for name, t, dim in (("prefix_tables", prefix_tables, 2), ("prefix_lens", prefix_lens, 1),
                             ("seq_group", seq_group, seq_group.dim() if seq_group is not None else 1)):
            check(t is not None, f"{name} is missing: a cascade batch needs prefix_tables, prefix_lens and seq_group")
            check_int(name, t, dim, block_tables.device)
        check(prefix_tables.shape[0] == prefix_lens.shape[0],
              f"prefix_tables has {prefix_tables.shape[0]} rows but prefix_lens has {prefix_lens.shape[0]} groups")
        check(seq_group.shape[0] == context_lens.shape[0],
              f"seq_group has {seq_group.shape[0]} entries for {context_lens.shape[0]} sequences")
        check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, num_blocks, block_size)


def check_attention(query, k_cache, v_cache, scale) -> None:
    check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    check_cache("k_cache", k_cache, query.device)
    check(query.dim() == 3, f"query: expected [tokens, heads, head_dim], got shape {tuple(query.shape)}")
    check(query.shape[2] == k_cache.shape[3], f"query head_dim {query.shape[2]} != cache head_dim {k_cache.shape[3]}")
    check(query.shape[2] % HEAD_DIM_MULTIPLE == 0,
          f"head_dim {query.shape[2]} is not a multiple of {HEAD_DIM_MULTIPLE} (the vector width every implementation assumes)")
    check(query.shape[1] % k_cache.shape[2] == 0,
          f"{query.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    check(query.dtype == k_cache.dtype == v_cache.dtype,
          f"query dtype {query.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must match")
    check(scale > 0, f"scale must be positive, got {scale}")


def check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, num_blocks: int,
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
        check(int(prefix_blocks.max()) <= prefix_tables.shape[1],
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


def check_block_copies(num_blocks: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """The range checks ``copy_blocks`` skips with ``check_indices=False``; pass host tensors."""
    check(src.shape == dst.shape, f"src has {src.numel()} blocks, dst {dst.numel()}")
    if src.numel():
        both = torch.cat([src, dst])
        check(int(both.min()) >= 0 and int(both.max()) < num_blocks,
              f"block id out of range [0, {num_blocks}) in copy_blocks")
        check(len(set(dst.tolist())) == dst.numel(), "copy_blocks: a destination block appears twice")


def check_like(name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    check(tuple(t.shape) == tuple(shape), f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    check(t.dtype == like.dtype and t.device == like.device,
          f"{name}: {t.dtype} on {t.device}, expected {like.dtype} on {like.device}")


def as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t [..., width]`` as a 2-D view ``[rows, width]`` with a unit last stride; never a copy,
    since the in-place ops write through it."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError as exc:
        raise ValueError(f"{name}: shape {tuple(t.shape)} with strides {t.stride()} is not viewable as rows") from exc
    check(rows.shape[1] <= 1 or rows.stride(1) == 1,
          f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    return rows


def check_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check(x.dtype in FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 input, got {x.dtype}")
    check(x.dim() >= 1, "x: expected [..., hidden], got a scalar")
    check_like("weight", weight, (x.shape[-1],), x)
    check(weight.is_contiguous(), "weight must be contiguous")
    check(eps >= 0, f"eps must be >= 0, got {eps}")


def check_sampling_values(temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          u: torch.Tensor) -> None:
    """The value checks ``sample_tokens`` skips with ``check_values=False``; pass the host
    tensors the device copies are made from (on a GPU, reading these is a host sync)."""
    if temperature.numel():
        check(bool(((temperature >= 0) & (top_k >= 0) & (top_p > 0) & (top_p <= 1) & (u >= 0) & (u < 1)).all()),
              "expected temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= u < 1 in every row")


# ----------------------------------------------------------------------------- one check per op


def check_store_kv(key, value, k_cache, v_cache, slot_mapping, check_indices: bool) -> None:
    check_cache("k_cache", k_cache, key.device)
    check(k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    check(key.shape == value.shape and key.dim() == 3 and key.shape[1:] == k_cache.shape[2:],
          f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match the cache's [*, {k_cache.shape[2]}, {k_cache.shape[3]}]")
    check_int("slot_mapping", slot_mapping, 1, key.device)
    check(slot_mapping.shape[0] == key.shape[0], f"slot_mapping has {slot_mapping.shape[0]} slots for {key.shape[0]} tokens")
    if check_indices:
        check_slots(slot_mapping, k_cache.shape[0] * k_cache.shape[1])


def check_paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale: float,
                                 check_indices: bool) -> None:
    check_attention(query, k_cache, v_cache, scale)
    check_int("block_tables", block_tables, 2, query.device)
    check_int("context_lens", context_lens, 1, query.device)
    check(query.shape[0] == context_lens.shape[0], f"{query.shape[0]} queries but {context_lens.shape[0]} context lengths")
    check(block_tables.shape[0] == context_lens.shape[0],
          f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if check_indices:
        check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])


def check_cascade_decode_attention(query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens,
                                   seq_group, scale: float, check_indices: bool) -> None:
    check_attention(query, k_cache, v_cache, scale)
    device = query.device
    for name, t, dim in (("block_tables", block_tables, 2), ("context_lens", context_lens, 1),
                         ("prefix_tables", prefix_tables, 2), ("prefix_lens", prefix_lens, 1)):
        check_int(name, t, dim, device)
    check(seq_group.dim() in (1, 2), f"seq_group: expected [B] or [B, L], got shape {tuple(seq_group.shape)}")
    check_int("seq_group", seq_group, seq_group.dim(), device)
    batch, num_groups = query.shape[0], prefix_lens.shape[0]
    check(context_lens.shape[0] == batch, f"{batch} queries but {context_lens.shape[0]} context lengths")
    check(seq_group.shape[0] == batch, f"seq_group has {seq_group.shape[0]} entries for {batch} sequences")
    check(prefix_tables.shape[0] == num_groups,
          f"prefix_tables has {prefix_tables.shape[0]} rows but prefix_lens has {num_groups} groups")
    check(block_tables.shape[0] == batch, f"block_tables has {block_tables.shape[0]} rows for {batch} sequences")
    if check_indices:
        check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])
        if batch:
            check_prefix_groups(block_tables, context_lens, prefix_tables, prefix_lens, seq_group, *k_cache.shape[:2])


def check_paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale: float,
                                 check_indices: bool) -> None:
    check_attention(query, k_cache, v_cache, scale)
    check_int("block_tables", block_tables, 2, query.device)
    check_int("context_lens", context_lens, 1, query.device)
    check_int("query_start_loc", query_start_loc, 1, query.device)
    check(query_start_loc.shape[0] == context_lens.shape[0] + 1,
          f"query_start_loc needs {context_lens.shape[0] + 1} entries, got {query_start_loc.shape[0]}")
    check(block_tables.shape[0] == context_lens.shape[0],
          f"block_tables has {block_tables.shape[0]} rows but context_lens has {context_lens.shape[0]}")
    if check_indices:
        check_query_starts(query_start_loc, context_lens, query.shape[0])
        check_block_table_indices(block_tables, context_lens, *k_cache.shape[:2])


def check_copy_blocks(kv_cache, src, dst, check_indices: bool) -> None:
    check(kv_cache.dim() == 6, f"kv_cache: expected [2, layers, blocks, block_size, kv_heads, head_dim], got {tuple(kv_cache.shape)}")
    check_int("src", src, 1, kv_cache.device)
    check_int("dst", dst, 1, kv_cache.device)
    check(src.shape == dst.shape, f"src has {src.numel()} blocks, dst {dst.numel()}")
    if check_indices:
        check_block_copies(kv_cache.shape[2], src, dst)


def check_prm_step_score(hidden, norm_weight, eps: float, head_weight, head_bias, positive_index: int, prev_agg,
                         prev_count, aggregation: str) -> None:
    n, width = hidden.shape if hidden.dim() == 2 else (None, None)
    check(hidden.dim() == 2, f"hidden: expected [tags, hidden], got shape {tuple(hidden.shape)}")
    check(head_weight.dim() == 2 and head_weight.shape[0] in (1, 2) and head_weight.shape[1] == width,
          f"head_weight: expected [1 or 2, {width}], got shape {tuple(head_weight.shape)}")
    check(norm_weight is None or tuple(norm_weight.shape) == (width,),
          f"norm_weight: expected [{width}], got shape {tuple(norm_weight.shape) if norm_weight is not None else None}")
    check(head_bias is None or tuple(head_bias.shape) == (head_weight.shape[0],),
          f"head_bias: expected [{head_weight.shape[0]}]")
    check(head_weight.shape[0] == 1 or positive_index in (0, 1), f"positive_index must be 0 or 1, got {positive_index}")
    check(aggregation in AGGREGATIONS, f"aggregation={aggregation!r}: expected one of {AGGREGATIONS}")
    check(tuple(prev_agg.shape) == (n,) and prev_agg.dtype == torch.float32,
          f"prev_agg: expected float32 [{n}], got {prev_agg.dtype} {tuple(prev_agg.shape)}")
    check_int("prev_count", prev_count, 1, hidden.device)
    check(prev_count.shape[0] == n, f"prev_count has {prev_count.shape[0]} entries for {n} tags")
    for name, t in (("norm_weight", norm_weight), ("head_weight", head_weight), ("head_bias", head_bias), ("prev_agg", prev_agg)):
        check(t is None or t.device == hidden.device, f"{name} is on {t.device if t is not None else None}, hidden on {hidden.device}")


def check_rotary_embedding(positions, query, key, cos_sin_cache, check_indices: bool) -> None:
    check(query.dim() == 3 and key.dim() == 3,
          f"query {tuple(query.shape)} and key {tuple(key.shape)}: expected [tokens, heads, head_dim]")
    tokens, _, dim = query.shape
    check(query.dtype in FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 query, got {query.dtype}")
    check(dim % 2 == 0, f"head_dim {dim} is odd")
    check_like("key", key, (tokens, key.shape[1], dim), query)
    for name, t in (("query", query), ("key", key)):
        check(t.numel() == 0 or (t.stride(2) == 1 and t.stride(1) == dim),
              f"{name}: each token's heads must be contiguous, got strides {t.stride()}")
    check_like("cos_sin_cache", cos_sin_cache, (cos_sin_cache.shape[0], dim), query)
    check(cos_sin_cache.is_contiguous(), "cos_sin_cache must be contiguous")
    check_int("positions", positions, 1, query.device)
    check(positions.shape[0] == tokens, f"{positions.shape[0]} positions for {tokens} tokens")
    if check_indices and tokens:
        lo, hi = int(positions.min()), int(positions.max())
        check(lo >= 0 and hi < cos_sin_cache.shape[0],
              f"positions span [{lo}, {hi}]; cos_sin_cache has {cos_sin_cache.shape[0]} rows")


def check_silu_and_mul_input(x) -> None:
    check(x.dtype in FLOAT_DTYPES, f"expected a float32, bfloat16 or float16 input, got {x.dtype}")
    check(x.dim() >= 1 and x.shape[-1] % 2 == 0, f"x: expected [..., 2d], got shape {tuple(x.shape)}")


def check_sample_tokens(logits, temperature, top_k, top_p, u, check_values: bool) -> None:
    check(logits.dim() == 2 and logits.dtype in FLOAT_DTYPES,
          f"logits: expected float32, bfloat16 or float16 [batch, vocab], got {logits.dtype} {tuple(logits.shape)}")
    check(logits.shape[1] > 0, "logits: the vocabulary is empty")
    batch = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_p", top_p), ("u", u)):
        check(tuple(t.shape) == (batch,) and t.dtype == torch.float32,
              f"{name}: expected float32 [{batch}], got {t.dtype} {tuple(t.shape)}")
        check(t.device == logits.device, f"{name} is on {t.device}, logits on {logits.device}")
    check_int("top_k", top_k, 1, logits.device)
    check(top_k.shape[0] == batch, f"top_k has {top_k.shape[0]} entries for {batch} rows")
    if check_values:
        check_sampling_values(temperature, top_k, top_p, u)
