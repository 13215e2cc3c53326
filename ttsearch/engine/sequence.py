"""A sequence on the paged cache: its tokens, its block table and its next-token logits."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

_ids = itertools.count()


@dataclass(eq=False)
class Seq:
    """Owned by an Engine. Every token in ``token_ids`` has its keys and values in the cache,
    and ``last_logits`` holds the logits after the last token (in the model's dtype)."""

    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the full blocks
    lineage: tuple[int, ...] = ()  # path in the fork tree; derives the random stream
    last_logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    forks: int = 0
    wants_logits: bool = True  # False: a verifier's sequence, never sampled from
    preempted: bool = False  # blocks released, tokens kept: see Engine.preempt
    cached_tokens: int = 0  # of its first tokens, those taken from the prefix cache when it was added or restored
    freed: bool = False
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        state = "freed" if self.freed else "preempted" if self.preempted else f"{len(self.block_table)} blocks"
        return f"Seq(id={self.seq_id}, len={len(self)}, {state})"
