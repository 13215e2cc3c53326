"""Sequences writing one reasoning step each, decoded together a token at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ttsearch.engine.sampler import GREEDY, SamplingParams, TokenLogprobs, per_seq
from ttsearch.engine.sequence import Seq

#: ``stop=WRITER_STOP`` in ``StepWriter.add``: the writer's own delimiter
WRITER_STOP: Any = object()


@dataclass
class StepResult:
    """One reasoning step written by one sequence."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (delimiter written, kept), "eos" (the answer ended), "length" (cut)
    logprobs: list[TokenLogprobs] | None = None  # per token, where the sampling asked for them


@dataclass(eq=False)
class StepInProgress:
    """A sequence's step so far: what ``StepWriter.remove`` hands back and ``resume`` takes."""

    seq: Seq
    sampling: SamplingParams
    stop: str | tuple[str, ...] | None  # a delimiter, or several (the step ends at the first written)
    max_tokens: int
    written: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per written token, where asked for


class StepEngine(Protocol):
    """What a ``StepWriter`` uses of its engine (``ttsearch.engine.Engine``): public methods only."""

    tokenizer: Any
    eos_token_ids: Any  # a collection of token ids
    max_model_len: int

    def check_steppable(self, seqs: Sequence[Seq]) -> None: ...

    def sample_step(self, seqs: Sequence[Seq], sampling: Sequence[SamplingParams]
                    ) -> list[tuple[int, TokenLogprobs | None]]: ...


class StepWriter:
    """Sequences writing one reasoning step each, decoded together a token at a time.

    ``add`` starts a step for more sequences at any point, each with its own sampling, stop
    delimiter and token limit; ``advance`` decodes one token for every sequence still
    writing and returns those whose step just ended, with its result: after the ``stop``
    delimiter (or any of several; kept in the text), at EOS, after ``max_tokens`` tokens, or at
    the context length. A scheduler that starts each next step as soon as the last one is scored keeps
    the batch full while slower steps are still being written. ``remove`` takes sequences
    out mid-step (a preempted problem) and ``resume`` puts them back where they were.
    """

    def __init__(self, engine: StepEngine, stop: str | None = "\n\n", max_tokens: int = 256):
        self.engine = engine
        self.stop = stop
        self.max_tokens = _check_max_tokens(max_tokens)
        self._writing: dict[int, StepInProgress] = {}
        self._ended: list[tuple[Seq, StepResult]] = []

    def __len__(self) -> int:
        """Sequences still writing their step."""
        return len(self._writing)

    def add(
        self,
        seqs: Sequence[Seq],
        sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
        stop: str | tuple[str, ...] | None = WRITER_STOP,
        max_tokens: int | None = None,
    ) -> None:
        seqs = list(seqs)
        params = per_seq(sampling, len(seqs))
        stop = self.stop if stop is WRITER_STOP else stop
        max_tokens = self.max_tokens if max_tokens is None else _check_max_tokens(max_tokens)
        self.resume([StepInProgress(seq, p, stop, max_tokens) for seq, p in zip(seqs, params)])

    def resume(self, steps: Sequence[StepInProgress]) -> None:
        """Continue steps taken out by ``remove`` (or start new ones)."""
        seqs = [s.seq for s in steps]
        self.engine.check_steppable(seqs)
        for seq in seqs:
            if seq.seq_id in self._writing:
                raise ValueError(f"{seq!r} is already writing a step")
        for step in steps:
            if len(step.seq) >= self.engine.max_model_len:
                self._ended.append((step.seq, self._result(step, "length")))
            else:
                self._writing[step.seq.seq_id] = step

    def progress(self, seq: Seq) -> StepInProgress | None:
        """The step ``seq`` is writing, so far (None when it writes none): for streaming."""
        return self._writing.get(seq.seq_id)

    def remove(self, seqs: Sequence[Seq]) -> list[StepInProgress]:
        """Stop decoding ``seqs`` now; returns their unfinished steps, for ``resume``."""
        return [self._writing.pop(seq.seq_id) for seq in seqs if seq.seq_id in self._writing]

    def advance(self) -> list[tuple[Seq, StepResult]]:
        """Decode one token for every sequence writing; returns the steps that ended. A full
        KV pool raises before anything changes."""
        steps = list(self._writing.values())
        sampled = self.engine.sample_step([s.seq for s in steps], [s.sampling for s in steps]) if steps else []
        ended, self._ended = self._ended, []
        for step, (token, logprobs) in zip(steps, sampled):
            step.written.append(token)
            if logprobs is not None:
                step.logprobs.append(logprobs)
            reason = self._reason(step)
            if reason is not None:
                del self._writing[step.seq.seq_id]
                ended.append((step.seq, self._result(step, reason)))
        return ended

    def _result(self, step: StepInProgress, reason: str) -> StepResult:
        text = self.engine.tokenizer.decode(step.written, skip_special_tokens=True)
        return StepResult(step.written, text, reason, step.logprobs if step.sampling.logprobs is not None else None)

    def _reason(self, step: StepInProgress) -> str | None:
        written = step.written
        if written[-1] in self.engine.eos_token_ids and not step.sampling.ignore_eos:
            return "eos"
        if step.stop:
            stops = (step.stop,) if isinstance(step.stop, str) else step.stop
            window = max(map(len, stops)) + 2  # tokens enough to spell a delimiter
            text = self.engine.tokenizer.decode(written[-window:], skip_special_tokens=True)  # as the step's text
            if any(stop in text for stop in stops):
                return "stop"
        if len(written) >= step.max_tokens or len(step.seq) >= self.engine.max_model_len:
            return "length"
        return None


def _check_max_tokens(max_tokens) -> int:
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    return max_tokens
