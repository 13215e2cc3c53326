"""The tree of prefixes a decode batch's sequences share, found from their block tables.

Decode attention reads each node of it once for all the sequences below it (cascade
attention, ``ttsearch.ops.cascade_decode_attention``). The model runner builds the tree of
each decode forward (``shared_prefix_tree``); a forward that replays a CUDA graph takes it cut
to its bucket's fixed maxima (``fit_tree``, with the caps from ``cuda_graphs.tree_caps``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from itertools import takewhile

MIN_SHARERS = 2  # sequences that must share a run of blocks before decode reads it once for all


@dataclass
class PrefixTree:
    """Runs of full blocks shared by several sequences of a decode batch, as a tree.

    ``nodes[g]`` lists node g's blocks. ``paths[b]`` lists the nodes on sequence b's path,
    outermost first; they tile the start of b's block table, and b's own tokens follow."""

    nodes: list[list[int]]
    paths: list[list[int]]

    def tokens_read(self, lengths: list[int], block_size: int) -> int:
        """Tokens a cascade decode reads: every node once, then each sequence's own tokens."""
        shared = sum(len(n) for n in self.nodes) * block_size
        own = sum(length - sum(len(self.nodes[g]) for g in path) * block_size
                  for length, path in zip(lengths, self.paths))
        return shared + own


def shared_prefix_tree(tables: list[list[int]], shareable: list[int]) -> PrefixTree:
    """The tree of block runs that at least ``MIN_SHARERS`` of the sequences share.

    ``tables[b]`` is sequence b's block table and ``shareable[b]`` how many of its leading
    blocks are full (only those can be shared). A node is a maximal run of blocks that the
    same set of sequences holds in the same columns; where that set splits, child nodes
    start. Sequences that share a system prompt through the prefix cache get one node for
    it, each problem's beams a node for its question and common steps below that, and so
    on down to the steps two beams still share."""
    nodes: list[list[int]] = []
    paths: list[list[int]] = [[] for _ in tables]
    pending = [(list(range(len(tables))), 0)]  # (sequences sharing columns [0, col), col)
    while pending:
        members, col = pending.pop()
        by_block: dict[int, list[int]] = {}
        for b in members:
            if col < shareable[b]:
                by_block.setdefault(tables[b][col], []).append(b)
        for group in by_block.values():
            if len(group) < MIN_SHARERS:
                continue
            first, end = tables[group[0]], col + 1
            limit = min(shareable[b] for b in group)
            while end < limit and all(tables[b][end] == first[end] for b in group):
                end += 1
            for b in group:
                paths[b].append(len(nodes))
            nodes.append(first[col:end])
            pending.append((group, end))
    return PrefixTree(nodes, paths)


def fit_tree(tree: PrefixTree, max_nodes: int, max_levels: int) -> PrefixTree:
    """``tree`` cut to at most ``max_nodes`` nodes and ``max_levels`` levels; ``tree``
    itself when it fits.

    A node is kept only with its parent, so every path keeps a prefix of itself and its
    nodes still tile the start of its sequence's context (the cut nodes' tokens become the
    sequences' own). From the roots down, the kept node is always the one whose single
    read saves the most token reads, ``(members - 1) * blocks``, among those whose parent
    is kept: a system prompt or a question before the steps below it. Kept nodes keep
    their order; their ids are renumbered."""
    if len(tree.nodes) <= max_nodes and all(len(p) <= max_levels for p in tree.paths):
        return tree
    members = [0] * len(tree.nodes)
    children: dict[int, list[int]] = {}
    roots, level = [], {}
    for path in tree.paths:
        for depth, g in enumerate(path):
            members[g] += 1
            if g not in level:
                level[g] = depth
                (children.setdefault(path[depth - 1], []) if depth else roots).append(g)

    def entry(g: int) -> tuple[int, int]:
        return -(members[g] - 1) * len(tree.nodes[g]), g

    heap = [entry(g) for g in roots if max_levels > 0]
    heapq.heapify(heap)
    kept: set[int] = set()
    while heap and len(kept) < max_nodes:
        _, g = heapq.heappop(heap)
        kept.add(g)
        if level[g] + 1 < max_levels:
            for child in children.get(g, ()):
                heapq.heappush(heap, entry(child))
    order = sorted(kept)
    new_id = {g: i for i, g in enumerate(order)}
    paths = [[new_id[g] for g in takewhile(kept.__contains__, path)] for path in tree.paths]
    return PrefixTree([tree.nodes[g] for g in order], paths)
