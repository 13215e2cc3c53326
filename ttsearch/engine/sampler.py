"""Sampling parameters and the batched sampler.

Every row of a batch may have its own temperature, top-k, top-p and random stream. The
random draw is one uniform number per row from the row's own generator (inverse CDF), so
a sequence's tokens depend only on its seed and its own history, never on what else is
in the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from ttsearch import ops


@dataclass(frozen=True)
class SamplingParams:
    """``temperature=0`` is greedy. ``top_k=0`` and ``top_p=1`` switch those filters off.
    ``seed`` seeds a sequence's random stream the first time it samples; forks of the
    sequence get streams derived from it, so one seed reproduces a whole tree. ``logprobs``
    (None: off) asks for each sampled token's log-probability and the ``logprobs`` most
    likely tokens' (``Engine.sample_step``). ``ignore_eos``: a step does not end at EOS but
    writes on to its stop string or token limit (vLLM's request option, which benchmarks use
    to fix the work done)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if problem := self.out_of_range(self.temperature, self.top_p, self.top_k):
            field, rule = problem
            raise ValueError(f"SamplingParams.{field} {rule}, got {getattr(self, field)!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and self.logprobs >= 0):
            raise ValueError(f"SamplingParams.logprobs must be None or an int >= 0, got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be true or false, got {self.ignore_eos!r}")

    @staticmethod
    def out_of_range(temperature, top_p, top_k) -> tuple[str, str] | None:
        """The first of these settings out of its range, as (name, the rule it breaks), or None:
        the one statement of the rules, for every place a setting comes in (search settings,
        HTTP requests, this class)."""
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            return "temperature", "must be >= 0"
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            return "top_p", "must be in (0, 1]"
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
            return "top_k", "must be an int >= 0"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = SamplingParams()


def per_seq(sampling: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` for each of ``n`` sequences, from one for all or a list of ``n``."""
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    params = list(sampling)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling: expected one SamplingParams or a list of {n}, got {sampling!r}")
    return params


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability and the most likely tokens' (id, log-probability),
    best first, from the model's distribution before temperature and filters (as vLLM's)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Float32 log-probabilities of ``rows`` of ``logits [B, V]`` (a copy: the sampler may
    write the logits in place)."""
    return torch.log_softmax(logits[rows].float(), dim=-1).cpu()


def token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """``token``'s entry of one row of log-probabilities, with the ``top`` best."""
    best = torch.topk(logprobs, top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprobs(float(logprobs[token]), pairs)


def derive_seed(seed: int, lineage: tuple[int, ...]) -> int:
    """A stable 63-bit seed for the sequence at ``lineage`` in the fork tree of ``seed``."""
    digest = hashlib.blake2b(repr((seed, lineage)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of ``logits [B, V]`` (float32, bf16 or fp16). ``generators[i]`` is used for the
    sampled (non-greedy) rows: one uniform draw each, taken here so that every stream
    advances by its own sequence's steps only. ``ops.sample_tokens`` does the rest."""
    u = [0.0 if p.greedy else torch.rand(1, generator=g).item() for p, g in zip(params, generators)]
    settings = _settings_on(logits.device, params, u)
    tokens = ops.sample_tokens(logits, *settings, check_values=False)
    return tokens.tolist()  # the step's one read from the device: the tokens it sampled


def _settings_on(device: torch.device, params: list[SamplingParams], u: list[float]) -> list[torch.Tensor]:
    """Each row's temperature, top_k, top_p and draw ``u`` on ``device``, checked here on the
    host and copied in one transfer, from pinned memory on CUDA: the host then never waits
    for the device, as a copy from pageable memory or a check of the device copies would."""
    top_k = [min(p.top_k, 2**31 - 1) for p in params]  # any k >= the vocabulary keeps it all
    # One float32 buffer: top_k rides in row 1 as int32 bits (the op takes int32 or int64).
    staged = torch.tensor([[p.temperature for p in params], [0.0] * len(params), [p.top_p for p in params], u],
                          dtype=torch.float32)
    staged[1].view(torch.int32).copy_(torch.tensor(top_k, dtype=torch.int32))
    ops.check_sampling_values(staged[0], staged[1].view(torch.int32), staged[2], staged[3])
    if device.type == "cuda":
        staged = staged.pin_memory()
    staged = staged.to(device, non_blocking=True)
    return [staged[0], staged[1].view(torch.int32), staged[2], staged[3]]
