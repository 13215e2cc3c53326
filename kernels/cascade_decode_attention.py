"""cascade_decode_attention: decode attention that reads each shared prefix node once for
all the sequences below it (multi-level cascade attention).

Node ``g`` holds ``prefix_lens[g]`` tokens (whole blocks, listed in ``prefix_tables[g]``);
row ``b`` of ``seq_group [B, L]`` lists the nodes on sequence ``b``'s path, outermost
first, then -1 (a 1-D ``seq_group`` is L = 1). The path's nodes tile the start of ``b``'s
context; attention over it splits at their boundaries, and the parts are merged by
log-sum-exp:

1. ``_prefix_kernel``, one program per (node, tile of members, kv head, node split): a
   member is a (sequence, level) entry holding the node. The query heads of up to
   ``BLOCK_M`` members that share the kv head are gathered into one ``[BLOCK_M x
   heads_per_kv, D]`` tile, which walks its split's range of the node's blocks once with
   an online softmax. Each key/value is so read once per tile instead of once per
   sequence, and the products are matrix-matrix rather than the decode's thin
   ``[heads_per_kv, D]``. A long node splits into ``node_splits`` ranges, so that a few
   nodes still fill the GPU. It writes each row's normalised output and log-sum-exp (log2
   domain, scaled scores) to float32 scratch ``[B, L, node_splits, H, D]`` and ``[B, L,
   node_splits, H]``, at the member's (sequence, level, split).
2. ``_suffix_kernel``, one program per (sequence, kv head, split), as
   ``paged_decode_attention``: its split of the sequence's own tokens ``[path_len,
   context)`` (the whole context for a sequence in no node, possibly nothing for one whose
   context ends with its last node) through its block table. It then folds in its share of
   the node partials of its path (split ``s`` of ``S`` takes every S-th, from the s-th),
   each as one more "tile" of the online softmax (a -1 entry carries weight 0). With one
   split it stores the final output in the query dtype, so no third launch merges them;
   with more, each split stores a partial that ``split_kv.merge_splits`` merges, as the
   decode kernel's are. A sequence in no node never reads the scratch and takes exactly the
   decode kernel's arithmetic (for the same split count).

The members of each node are found on the device (a stable sort of the flattened
``[B * L]`` entries and a search for each node's first member), without synchronising
with the host: the prefix grid covers ``ceil(batch / BLOCK_M)`` tiles per node (a node
is at most once on a path, so it has at most ``batch`` members), and tiles past a node's
members exit at once. Batches with no node at all go straight to the decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttsearch.kernels.attention_tile import attend_paged_tiles, decode_block_n, row_tile
from ttsearch.kernels.decode_attention import decode_epilogue, decode_prologue, paged_decode_attention_split
from ttsearch.kernels.split_kv import choose_splits, merge_splits, split_range, split_scratch, store_split
from ttsearch.kernels.utils import dot_dtype

_LOG2E = 1.4426950408889634


@triton.jit
def _prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    prefix_tables_ptr, prefix_lens_ptr, members_ptr, member_starts_ptr,
    scale_log2, tiles_per_node, num_levels,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_pg, stride_pn,
    num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, NODE_SPLIT: tl.constexpr,
):
    node = tl.program_id(0) // tiles_per_node
    tile = tl.program_id(0) % tiles_per_node
    kv_head = tl.program_id(1)
    first = tl.load(member_starts_ptr + node)
    count = tl.load(member_starts_ptr + node + 1) - first
    if tile * BLOCK_M >= count:
        return
    # Even an empty split stores (weight 0): the suffix kernel reads every split's slot.
    lo, hi = 0, tl.load(prefix_lens_ptr + node)
    if NODE_SPLIT:  # a constexpr, as in the suffix kernel
        lo, hi = split_range(lo, hi, BLOCK_N)

    # Row r of the tile: query head r % GROUP (of this kv head) of the tile's member r // GROUP,
    # a flat (sequence, level) entry of seq_group.
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    member = tile * BLOCK_M + r // GROUP
    rows_valid = (r < BLOCK_M * GROUP) & (member < count)
    entry = tl.load(members_ptr + first + member, mask=rows_valid, other=0).to(tl.int64)
    seq = entry // num_levels
    heads = kv_head * GROUP + r % GROUP
    q_mask = rows_valid[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    # Running max (log2 domain), denominator and unnormalised output per row.
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, lo, hi, k_cache_ptr, v_cache_ptr, prefix_tables_ptr + node * stride_pg, kv_head,
        scale_log2, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_pn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE,
    )

    # Padding rows are not stored.
    rows = (entry * tl.num_programs(2) + tl.program_id(2)) * num_heads + heads  # into the [B, L, P, H] scratch
    store_split(out_ptr, lse_ptr, rows, rows_valid, m, l, acc, HEAD_DIM, BLOCK_D)


@triton.jit
def _suffix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, lens_ptr,
    seq_group_ptr, path_lens_ptr, prefix_out_ptr, prefix_lse_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_levels, node_splits,
    stride_qb, stride_qh, stride_qd,
    stride_ob, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_tb, stride_tn,
    stride_sb, stride_sl,
    num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    # The tokens past those the path's nodes hold (this split's part of them).
    lo, hi = tl.load(path_lens_ptr + seq), tl.load(lens_ptr + seq)
    if SPLIT:  # a constexpr: one split runs exactly the unsplit kernel
        lo, hi = split_range(lo, hi, BLOCK_N)

    # The sequence's own tokens, exactly as the decode kernel walks a context.
    q, m, l, acc = decode_prologue(q_ptr, seq, kv_head, stride_qb, stride_qh, stride_qd,
                                   GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, DOT_DTYPE)
    m, l, acc = attend_paged_tiles(
        q, m, l, acc, lo, hi, k_cache_ptr, v_cache_ptr, tables_ptr + seq * stride_tb, kv_head,
        scale_log2, stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd, stride_tn,
        HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_DTYPE,
    )

    # Fold in this split's share of the node partials (normalised output o, log-sum-exp
    # lse; part i is split i % node_splits of level i // node_splits) as weight 2^lse on
    # o. A -1 entry reads nothing: lse = -inf gives it weight 0 and leaves m, l, acc as
    # they are. An empty suffix starts with m = -inf, l = 0, acc = 0; until some part is
    # finite, the shift stays 0 rather than computing (-inf) - (-inf).
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    for part in range(split, num_levels * node_splits, num_splits):
        node = tl.load(seq_group_ptr + seq * stride_sb + (part // node_splits) * stride_sl)
        rows = (seq * num_levels * node_splits + part) * num_heads + heads  # into the [B, L, P, H] scratch
        # (A comparison rather than `(g < GROUP) & (node >= 0)`: Triton's interpreter turns
        # the `&` of a block and a scalar mask into int32, which tl.load refuses as a mask.)
        from_node = g < tl.where(node >= 0, GROUP, 0)
        lse = tl.load(prefix_lse_ptr + rows, mask=from_node, other=float("-inf"))
        # Padding heads (never stored) take o = 0 at weight 1, so they end finite.
        lse = tl.where(g < GROUP, lse, 0.0)
        o_mask = from_node[:, None] & (d < HEAD_DIM)[None, :]
        o = tl.load(prefix_out_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=o_mask, other=0.0)
        m_new = tl.maximum(m, lse)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        beta = tl.exp2(lse - shift)
        l = l * alpha + beta
        acc = acc * alpha[:, None] + o * beta[:, None]
        m = m_new

    # A split with no token and no finite part stores weight 0 (contexts are never empty,
    # so some split of the sequence is finite).
    decode_epilogue(out_ptr, part_out_ptr, part_lse_ptr, seq, kv_head, split, num_splits, num_heads, m, l, acc,
                    stride_ob, stride_oh, stride_od, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, SPLIT)


def cascade_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return cascade_decode_attention_split(query, k_cache, v_cache, block_tables, context_lens, prefix_tables,
                                          prefix_lens, seq_group, scale)


def cascade_decode_attention_split(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    node_splits: int | None = None,
) -> torch.Tensor:
    """``cascade_decode_attention`` with each sequence's own tokens split ``num_splits``
    ways and each node ``node_splits`` ways (None: the ``split_kv.choose_splits``
    heuristic; a count forces it, for tests and benchmarks)."""
    batch, num_heads, head_dim = query.shape
    num_nodes = prefix_lens.shape[0]
    path = seq_group if seq_group.dim() == 2 else seq_group[:, None]  # [B, L]
    num_levels = path.shape[1]
    if batch == 0 or num_nodes == 0 or num_levels == 0:
        return paged_decode_attention_split(query, k_cache, v_cache, block_tables, context_lens, scale, num_splits)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    dtype = dot_dtype(query)

    # Members of each node, on the device: the flat (sequence, level) entries sorted by node
    # (stable, so in batch order), and where each node's run starts; -1 sorts first and is
    # skipped.
    sorted_nodes, members = torch.sort(path.reshape(-1).long(), stable=True)
    member_starts = torch.searchsorted(sorted_nodes, torch.arange(num_nodes + 1, device=query.device))
    # Where each sequence's own suffix starts: the tokens of its path's nodes.
    path_lens = torch.where(path >= 0, prefix_lens[path.clamp(min=0).long()], 0).sum(1, dtype=torch.int32)

    # The prefix tile: BLOCK_M members x GROUP heads in BLOCK_R rows.
    block_r, block_n = row_tile(query.dtype, group)
    block_m = block_r // group
    tiles_per_node = triton.cdiv(batch, block_m)
    if node_splits is None:
        # Tiles that can hold members: at most one part-filled tile per node, the rest full.
        tiles = min(num_nodes * tiles_per_node, num_nodes + batch * num_levels // block_m)
        node_splits = choose_splits(tiles * kv_heads, prefix_tables.shape[1] * block_size, query.device)
    prefix_out = torch.empty(batch, num_levels, node_splits, num_heads, head_dim, dtype=torch.float32,
                             device=query.device)
    prefix_lse = torch.empty(batch, num_levels, node_splits, num_heads, dtype=torch.float32, device=query.device)
    _prefix_kernel[(num_nodes * tiles_per_node, kv_heads, node_splits)](
        query, k_cache, v_cache, prefix_out, prefix_lse,
        prefix_tables, prefix_lens, members, member_starts,
        scale * _LOG2E, tiles_per_node, num_levels,
        *query.stride(), *k_cache.stride(), *v_cache.stride(), *prefix_tables.stride(),
        num_heads,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_N=block_n,
        DOT_DTYPE=dtype, NODE_SPLIT=node_splits > 1,
        num_warps=4,
    )

    # The tails split as the decode kernel would split the same batch, so a sequence in no
    # node gets exactly its result.
    if num_splits is None:
        num_splits = choose_splits(batch * kv_heads, block_tables.shape[1] * block_size, query.device)
    out = torch.empty_like(query)
    part_out, part_lse = split_scratch(query, num_splits) if num_splits > 1 else (out, out)
    _suffix_kernel[(batch, kv_heads, num_splits)](
        query, k_cache, v_cache, out, block_tables, context_lens,
        path, path_lens, prefix_out, prefix_lse, part_out, part_lse,
        scale * _LOG2E, num_levels, node_splits,
        *query.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_tables.stride(), *path.stride(),
        num_heads,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=decode_block_n(query.dtype),
        DOT_DTYPE=dtype, SPLIT=num_splits > 1,
        num_warps=4,
    )
    if num_splits > 1:
        merge_splits(part_out, part_lse, out)
    return out
