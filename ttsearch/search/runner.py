"""The scheduler: many problems searched together, every live beam in one batch.

Every live beam of every problem in flight decodes in one batch, a token at a time. When all
beams of a problem have ended their step, the steps are scored (one verifier call for every
problem ready at that token), its strategy decides what survives, and its next step joins
the batch. When a problem finishes, its record is handed to ``on_record`` and the next
problem starts.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from ttsearch.engine.engine import StepResult
from ttsearch.engine.sampler import SamplingParams
from ttsearch.eval.datasets import Problem
from ttsearch.eval.grading import answer_key, extract_answer, is_equivalent
from ttsearch.search.compute_optimal import ComputeOptimal, read_table
from ttsearch.search.config import SearchConfig
from ttsearch.search.selection import SELECTIONS, budgets, select
from ttsearch.search.strategies import SEARCHES, Beam, TreeSearch


def build_prompt(tokenizer, question: str, config: SearchConfig) -> list[int]:
    """The policy's chat template with its generation prompt: the system prompt, the
    worked example if configured, then the question. A fixed ``date_string`` keeps
    templates that print a date (Llama 3.x) from depending on the day the run happens."""
    messages = [{"role": "system", "content": config.system_prompt}]
    if config.example_question is not None:
        messages += [
            {"role": "user", "content": config.example_question},
            {"role": "assistant", "content": config.example_solution},
        ]
    messages.append({"role": "user", "content": question})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, date_string="26 Jul 2024"
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages) + "\n\n")


def problem_seed(seed: int, problem_id: str) -> int:
    """A problem's random stream depends on the run seed and its id, not on its batch."""
    return (seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (1 << 62)


def verifier_tokens(verifier) -> int:
    """Tokens the verifier has forwarded so far (0 for a programmatic checker)."""
    engine = getattr(verifier, "engine", None)
    return engine.tokens_forwarded if engine is not None else 0


@dataclass
class Job:
    problem: Problem
    search: TreeSearch
    sampling: SamplingParams
    started: float
    tokens_generated: int = 0
    tokens_verified: float = 0.0
    peak_blocks: int = 0
    extra: dict = field(default_factory=dict)


def make_search(problem: Problem, policy, verifier, config: SearchConfig) -> TreeSearch:
    prompt_ids = build_prompt(policy.tokenizer, problem.question, config)
    if config.strategy == "compute_optimal":
        table = read_table(config.optimal_table)
        return ComputeOptimal(policy, verifier, config, prompt_ids, problem.question, table)
    return SEARCHES[config.strategy](policy, verifier, config, prompt_ids, problem.question)


def run_jobs(
    problems: Iterable[Problem],
    policy,
    verifier,
    config: SearchConfig,
    on_record: Callable[[dict], None],
    progress: bool = True,
) -> None:
    """Search every problem, at most ``config.problems_in_flight`` at once."""
    pending = list(problems)
    bar = tqdm(total=len(pending), desc=config.strategy, unit="problem", disable=not progress)
    scheduler = Scheduler(policy, verifier, config)
    correct = done = 0
    started = time.perf_counter()
    upcoming: TreeSearch | None = None  # the next problem's search, built once
    while pending or scheduler.jobs:
        while pending and len(scheduler.jobs) < config.problems_in_flight:
            if upcoming is None:
                upcoming = make_search(pending[0], policy, verifier, config)
            if scheduler.jobs and not scheduler.has_room_for(upcoming):
                break  # the KV pool fills up: admit it when a running problem has finished
            problem = pending.pop(0)
            sampling = SamplingParams(
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                seed=problem_seed(config.seed, problem.id),
            )
            scheduler.add(Job(problem, upcoming, sampling, time.perf_counter()))
            upcoming = None
        for job in scheduler.step():
            record = make_record(job, config)
            correct += record["selections"]["naive"][str(config.n)]["correct"]
            on_record(record)
            done += 1
            bar.update(1)
            tok_s = scheduler.generated / (time.perf_counter() - started)
            bar.set_postfix(tok_s=f"{tok_s:.0f}", acc=f"{correct / done:.2f}")
    bar.close()


class Scheduler:
    """Every live beam of every job writes its step in one decode batch, a token at a time.

    A job's iteration ends when all its beams have ended their step: its steps are scored
    (with those of every other job ending in the same token, in one verifier call), its
    strategy advances, and its next step starts at once. So a problem with short steps does
    not wait for another's long ones, and the batch stays full.
    """

    def __init__(self, policy, verifier, config: SearchConfig):
        self.policy = policy
        self.verifier = verifier
        self.config = config
        self.writer = policy.step_writer(config.stop, config.max_step_tokens)
        self.jobs: list[Job] = []
        self.generated = 0
        self._writing: dict[int, tuple[Job, Beam]] = {}  # id(policy seq) -> its job and beam
        self._steps: dict[int, dict[int, StepResult]] = {}  # id(job) -> beam_id -> its ended step

    def has_room_for(self, search: TreeSearch) -> bool:
        """Whether the policy's KV pool can take ``search`` too: its prompt, and a whole step
        (plus a copied tail block) for every live beam, its own first ones included."""
        block = self.policy.block_size
        beams = sum(len(job.search.live) for job in self.jobs) + search.config.n  # n: live beams at most
        step_blocks = -(-self.config.max_step_tokens // block) + 1
        needed = -(-len(search.prompt_ids) // block) + beams * step_blocks
        return self.policy.blocks.num_available >= needed

    def add(self, job: Job) -> None:
        """Start ``job``'s search and its first step."""
        job.search.start()
        self.jobs.append(job)
        self._begin_step(job)

    def step(self) -> list[Job]:
        """Decode one token for every beam writing; score and advance each job whose beams
        have all ended their step. Returns the jobs whose search is done (no longer held)."""
        for seq, result in self.writer.advance():
            job, beam = self._writing.pop(id(seq))
            self._steps[id(job)][beam.beam_id] = result
        ready = [job for job in self.jobs if len(self._steps[id(job)]) == len(job.search.live)]
        if not ready:
            return []
        self._score_and_advance(ready)
        done = [job for job in ready if job.search.done]
        for job in ready:
            if job.search.done:
                self.jobs.remove(job)
                del self._steps[id(job)]
            else:
                self._begin_step(job)
        return done

    def _begin_step(self, job: Job) -> None:
        self._steps[id(job)] = {}
        for beam in job.search.live:
            self._writing[id(beam.seq)] = (job, beam)
        self.writer.add([beam.seq for beam in job.search.live], job.sampling)

    def _score_and_advance(self, jobs: list[Job]) -> None:
        """Score the ended steps of ``jobs`` in one verifier call; each strategy advances."""
        beams = [(job, beam, self._steps[id(job)][beam.beam_id]) for job in jobs for beam in job.search.live]
        before = verifier_tokens(self.verifier)
        scores = self.verifier.score(
            [b.vstate for _, b, _ in beams], [r.text for _, _, r in beams], policy_seqs=[b.seq for _, b, _ in beams]
        ) if beams else []
        verified = verifier_tokens(self.verifier) - before
        step_tokens = sum(len(r.token_ids) for _, _, r in beams) or 1
        for (job, beam, result), score in zip(beams, scores):
            beam.steps.append(result.text)
            beam.step_scores.append(score)
            beam.aggregate = beam.vstate.aggregate
            beam.tokens += len(result.token_ids)
            beam.last_step_cut = result.finish_reason == "length"
            job.tokens_generated += len(result.token_ids)
            # one verifier call serves every job in it: its tokens are shared in proportion
            job.tokens_verified += verified * len(result.token_ids) / step_tokens
            if result.finish_reason == "eos":
                beam.finish = "eos"
            elif len(beam.seq) >= self.policy.max_model_len:
                beam.finish = "context"
        self.generated += sum(len(r.token_ids) for _, _, r in beams)
        blocks = self.policy.blocks.num_used
        for job in jobs:
            job.peak_blocks = max(job.peak_blocks, blocks)
            if "first_step_scores" not in job.extra:  # the difficulty estimate compute_optimal fits on
                job.extra["first_step_scores"] = [b.step_scores[0] for b in job.search.live]
            job.search.advance()


def make_record(job: Job, config: SearchConfig) -> dict:
    problem, search = job.problem, job.search
    completions = []
    for beam in search.completions:
        answer = extract_answer(beam.text)
        completions.append(
            {
                "text": beam.text,
                "step_scores": beam.step_scores,
                "aggregate": beam.aggregate,
                "answer": answer,
                "correct": answer is not None and is_equivalent(answer, problem.answer),
            }
        )
    selections = {}
    for method in SELECTIONS:
        selections[method] = {}
        for n in budgets(config.n):
            chosen = select([(c["answer"], c["aggregate"]) for c in completions[:n]], method, key=answer_key)
            selections[method][str(n)] = {
                "answer": chosen,
                "correct": chosen is not None and is_equivalent(chosen, problem.answer),
            }
    return {
        "id": problem.id,
        "question": problem.question,
        "reference": problem.answer,
        "level": problem.level,
        "strategy": config.strategy,
        "n": config.n,
        "beam_width": config.beam_width,
        "completions": completions,
        "unfinished": len(search.unfinished),
        "iterations": search.iteration,
        "selections": selections,
        "tokens_generated": job.tokens_generated,
        "tokens_verified": round(job.tokens_verified),
        "peak_kv_blocks": job.peak_blocks,
        "seconds": round(time.perf_counter() - job.started, 3),
        **job.extra,
        **_compute_optimal_fields(search),
    }


def _compute_optimal_fields(search: TreeSearch) -> dict:
    if not isinstance(search, ComputeOptimal):
        return {}
    return {"pilot_level": search.pilot_level, "choice": search.choice}
