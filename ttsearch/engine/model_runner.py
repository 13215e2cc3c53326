"""The model runner: sequences and their new tokens in, one forward pass on the paged cache out.

It owns the cache writes: each sequence's next slots (copying a shared partial tail first,
copy-on-write), the registration of blocks that became full (the prefix cache), and, for a
decode batch, the tree of prefixes its sequences share, so that decode attention reads every
shared block once for all the sequences below it.
"""

from __future__ import annotations

import torch

from ttsearch import batch_invariant, ops
from ttsearch.engine.block_manager import BlockManager
from ttsearch.engine.cuda_graphs import CudaGraphRunner
from ttsearch.engine.prefix_tree import PrefixTree, shared_prefix_tree
from ttsearch.engine.sequence import Seq
from ttsearch.models.llama import ForwardBatch, LlamaModel


class ModelRunner:
    """Runs the model on the paged cache for the engine; block counts live in ``blocks``."""

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, blocks: BlockManager, device: torch.device,
                 graphs: CudaGraphRunner | None = None):
        self.model = model
        self.graphs = graphs  # decode forwards that fit its buckets replay CUDA graphs (cuda_graphs.py)
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = device
        self.tokens_forwarded = 0  # every token a forward has written, all sequences
        self.last_prefix_tree: PrefixTree | None = None  # of the last decode forward, for tests and meters

    # ------------------------------------------------------------------ block accounting
    def blocks_needed(self, seq: Seq, n: int) -> int:
        """Blocks that writing ``n`` more tokens to ``seq`` takes from the pool."""
        grow = -(-(len(seq) + n) // self.block_size) - len(seq.block_table)
        return grow + int(self._tail_is_shared(seq))

    def _tail_is_shared(self, seq: Seq) -> bool:
        return len(seq) % self.block_size != 0 and self.blocks.ref_count[seq.block_table[-1]] > 1

    def _reserve(self, seq: Seq, n: int, copies: list[tuple[int, int]]) -> list[int]:
        """Make ``seq``'s next ``n`` slots writable: copy a shared partial tail (queued in
        ``copies``) and allocate new blocks. Returns the slots."""
        if self._tail_is_shared(seq):
            shared = seq.block_table[-1]
            private = self.blocks.allocate()
            copies.append((shared, private))
            self.blocks.release(shared)
            seq.block_table[-1] = private
        while len(seq.block_table) * self.block_size < len(seq) + n:
            seq.block_table.append(self.blocks.allocate())
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(len(seq), len(seq) + n)]

    def _register_full_blocks(self, seq: Seq) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(self.blocks.register(seq.block_table[i], parent, tokens))

    # ------------------------------------------------------------------ the forward pass
    def forward(self, seqs: list[Seq], new_tokens: list[list[int]], logits: bool = True) -> torch.Tensor:
        """Write ``new_tokens[i]`` to ``seqs[i]`` in one batched forward (capacity already
        checked), keep each sequence's next-token logits, return the new tokens' hidden states."""
        copies: list[tuple[int, int]] = []
        slots, positions, input_ids, last_rows, q_starts = [], [], [], [], [0]
        for seq, tokens in zip(seqs, new_tokens):
            slots += self._reserve(seq, len(tokens), copies)
            positions += range(len(seq), len(seq) + len(tokens))
            input_ids += tokens
            q_starts.append(len(input_ids))
            last_rows.append(len(input_ids) - 1)
        if copies:
            src, dst = zip(*copies)
            src, dst = _host(src, torch.int64), _host(dst, torch.int64)
            ops.check_block_copies(self.kv_cache.shape[2], src, dst)
            ops.copy_blocks(self.kv_cache, src.to(self.device, non_blocking=True), dst.to(self.device, non_blocking=True),
                            check_indices=False)
        for seq, tokens in zip(seqs, new_tokens):
            seq.token_ids += tokens
        width = max(len(s.block_table) for s in seqs)
        decode = all(len(t) == 1 for t in new_tokens)
        graphed = decode and self.graphs is not None and self.graphs.fits(len(seqs))
        # Built and checked on the host, once per forward; the device copies are then never
        # read back (on a GPU each read would stall it, once per layer).
        host = ForwardBatch(
            positions=_host(positions, torch.int64),
            slot_mapping=_host(slots, torch.int64),
            block_tables=_host([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32),
            context_lens=_host([len(s) for s in seqs], torch.int32),
            query_start_loc=None if decode else _host(q_starts, torch.int32),
            last_rows=_host(last_rows, torch.int64),
        )
        if decode:
            self._add_prefix_tree(host, seqs, graphed)
        ops.check_metadata(
            self.kv_cache.shape[2], self.block_size, host.block_tables, host.context_lens, host.slot_mapping,
            host.query_start_loc, host.prefix_tables, host.prefix_lens, host.seq_group,
        )
        if graphed:  # one row per sequence, in order
            hidden = self.graphs.forward(_host(input_ids, torch.int64), host)
        else:
            batch = host.to(self.device)
            hidden = self.model.forward(_host(input_ids, torch.int64).to(self.device, non_blocking=True), batch,
                                        self.kv_cache)
        if logits:
            rows = self.model.compute_logits(hidden if graphed else hidden[batch.last_rows])
        else:
            rows = [None] * len(seqs)
        self.tokens_forwarded += len(input_ids)
        for seq, row in zip(seqs, rows):
            seq.last_logits = row
            self._register_full_blocks(seq)
        return hidden

    def _add_prefix_tree(self, batch: ForwardBatch, seqs: list[Seq], graphed: bool = False) -> None:
        """Give a decode batch the tree of prefixes its sequences share (from their block
        tables, so beams of one problem and problems sharing a system prompt through the
        prefix cache are found alike); decode attention then reads each node once. A
        ``graphed`` batch's tree is cut to the fixed maxima of its CUDA graph."""
        bs = self.block_size
        tree = PrefixTree([], [[] for _ in seqs])
        if not batch_invariant.enabled():  # reading a prefix once for many changes the order of its sums
            tree = shared_prefix_tree([s.block_table for s in seqs], [(len(s) - 1) // bs for s in seqs])
            if graphed:
                tree = self.graphs.fit_tree(tree, len(seqs))
        self.last_prefix_tree = tree
        if not tree.nodes:
            return
        width = max(len(n) for n in tree.nodes)
        depth = max(len(p) for p in tree.paths)
        batch.prefix_tables = _host([n + [0] * (width - len(n)) for n in tree.nodes], torch.int32)
        batch.prefix_lens = _host([len(n) * bs for n in tree.nodes], torch.int32)
        batch.seq_group = _host([p + [-1] * (depth - len(p)) for p in tree.paths], torch.int32)


def _host(values, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)
