"""Plain generation in the scheduler: one prompt's ``n`` choices, each written to a stop string,
EOS or its token limit in the same decode batch as the searches, and never scored.

The prompt is added through the policy's prefix cache, so a prompt that extends an earlier
one (a step-wise client re-sending its path grown by one step, or a sibling's path) forwards
only what the cache does not hold; ``cached_tokens`` says how many tokens were reused. The
choices are forks of the prompt, sharing its blocks. Finished choices are freed at once, and
their full blocks stay in the prefix cache for the next request.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttsearch.engine.sampler import SamplingParams
from ttsearch.engine.step_writer import StepResult
from ttsearch.search.strategies import Write


@dataclass(frozen=True)
class GenerationParams:
    """What a request asks of each choice (vLLM's sampling parameters, as far as they go here)."""

    n: int = 1
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # the text is cut before the first one written
    include_stop_str_in_output: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int | None = None  # None: none; k: the sampled token's and the top k
    ignore_eos: bool = False  # write past EOS to a stop string or max_tokens

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              logprobs=self.logprobs, ignore_eos=self.ignore_eos)


@dataclass(eq=False)
class Choice:
    """One choice being written: its sequence while it writes, then its step."""

    index: int
    seq: object
    result: StepResult | None = None
    vstate = None  # nothing is scored: the scheduler finds no verifier state to preempt or restore

    @property
    def beam_id(self) -> int:
        return self.index


@dataclass
class Output:
    """A finished choice as a client sees it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string or EOS) or "length"
    stop_reason: str | None  # the stop string that ended it (None at EOS or a length cut)
    logprobs: list | None


class Generation:
    """A generation request in the scheduler (which tells it from a search by ``scored``)."""

    scored = False
    waits_for_all = False

    def __init__(self, policy, prompt_ids: list[int], params: GenerationParams):
        self.policy = policy
        self.prompt_ids = prompt_ids
        self.params = params
        self.choices: list[Choice] = []
        self.live: list[Choice] = []
        self.cached_tokens = 0

    @property
    def done(self) -> bool:
        return not self.live

    @property
    def first_beams(self) -> int:
        """The sequences it writes with first: its choices."""
        return self.params.n

    def held(self) -> list[Choice]:
        return self.live

    def start(self) -> None:
        root = self.policy.add(self.prompt_ids)
        self.cached_tokens = root.cached_tokens
        seqs = [root] if self.params.n == 1 else self.policy.fork(root, self.params.n)
        if self.params.n > 1:
            self.policy.free(root)  # the choices hold its blocks
        self.choices = [Choice(i, seq) for i, seq in enumerate(seqs)]
        self.live = list(self.choices)

    def write_for(self, choice: Choice) -> Write:
        return Write(self.params.stop or None, self.params.max_tokens)

    def record(self, steps: list[tuple[Choice, StepResult]]) -> None:
        """Choices whose step ended: they are done, and their blocks go back to the pool."""
        for choice, result in steps:
            choice.result = result
            self.policy.free(choice.seq)
        ended = {id(choice) for choice, _ in steps}
        self.live = [c for c in self.live if id(c) not in ended]

    def abort(self) -> None:
        for choice in self.live:
            self.policy.free(choice.seq)
        self.live = []

    def output(self, choice: Choice) -> Output:
        """A finished choice's text, cut at the first stop string (which it keeps only with
        ``include_stop_str_in_output``), and why it ended."""
        result = choice.result
        text, stop_reason = result.text, None
        if result.finish_reason == "stop":
            found = [(text.find(s), s) for s in self.params.stop if s in text]
            if found:
                at, stop_reason = min(found, key=lambda f: f[0])
                text = text[: at + (len(stop_reason) if self.params.include_stop_str_in_output else 0)]
        finish = "length" if result.finish_reason == "length" else "stop"
        return Output(text, result.token_ids, finish, stop_reason, result.logprobs)
