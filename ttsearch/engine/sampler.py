"""Sampling parameters and the batched sampler.

Every row of a batch may have its own temperature, top-k, top-p and random stream. The
random draw is one uniform number per row from the row's own generator (inverse CDF), so
a sequence's tokens depend only on its seed and its own history, never on what else is
in the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` switch those filters off.
    ``seed`` seeds a sequence's random stream the first time it samples; forks of the
    sequence get streams derived from it, so one seed reproduces a whole tree."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k must be an int >= 0, got {self.top_k!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams()
NUCLEUS_CANDIDATES = 512


def derive_seed(seed: int, lineage: tuple[int, ...]) -> int:
    """A stable 63-bit seed for the sequence at ``lineage`` in the fork tree of ``seed``."""
    digest = hashlib.blake2b(repr((seed, lineage)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits [B, V]`` (float32). ``generators[i]`` is used for the
    sampled (non-greedy) rows."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        temperatures = [params[i].temperature for i in rows]
        sub = logits if len(rows) == len(params) else logits[idx]  # no copy of a batch that all samples
        if len(set(temperatures)) == 1:
            sub = sub / temperatures[0]
        else:
            sub = sub / torch.tensor(temperatures, device=logits.device)[:, None]
        sub = _filter_top_k(sub, [params[i].top_k for i in rows])
        probs = torch.softmax(sub, dim=-1)
        probs = _filter_top_p(probs, [params[i].top_p for i in rows])
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows]).to(logits.device)
        cdf = probs.cumsum(dim=-1)
        # right side: the first token whose cumulative mass exceeds the draw, never a zero-mass one
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens[idx] = picked.clamp(max=logits.shape[1] - 1)
    return tokens.tolist()


def _filter_top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    if not any(ks):
        return logits
    vocab = logits.shape[1]
    k = torch.tensor([k if 0 < k < vocab else vocab for k in ks], device=logits.device)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(probs: torch.Tensor, ps: list[float]) -> torch.Tensor:
    if all(p >= 1 for p in ps):
        return probs
    top_p = torch.tensor(ps, device=probs.device)[:, None]
    # The nucleus almost always lies within the top few hundred tokens: sort only those,
    # and the whole row only where they do not reach top_p.
    k = min(NUCLEUS_CANDIDATES, probs.shape[1])
    sorted_probs, order = probs.topk(k, dim=-1)
    if k < probs.shape[1] and bool((sorted_probs.sum(-1, keepdim=True) < top_p).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # keeps at least the top token
    return torch.zeros_like(probs).scatter(1, order, sorted_probs)
