"""The scheduler: many problems searched together, every live beam in one batch.

Each iteration, every live beam of every problem in flight writes one step in a single
``generate_step`` call and all new steps are scored in a single verifier call; then each
problem's strategy decides what survives. When a problem finishes, its record is handed
to ``on_record`` and the next problem starts.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tqdm import tqdm

from ttsearch.engine.sampler import SamplingParams
from ttsearch.eval.datasets import Problem
from ttsearch.eval.grading import answer_key, extract_answer, is_equivalent
from ttsearch.search.compute_optimal import ComputeOptimal, read_table
from ttsearch.search.config import SearchConfig
from ttsearch.search.selection import SELECTIONS, budgets, select
from ttsearch.search.strategies import SEARCHES, TreeSearch


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
    return engine.stats()["tokens_forwarded"] if engine is not None else 0


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
    running: list[Job] = []
    correct = generated = done = 0
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < config.problems_in_flight:
            problem = pending.pop(0)
            sampling = SamplingParams(
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                seed=problem_seed(config.seed, problem.id),
            )
            job = Job(problem, make_search(problem, policy, verifier, config), sampling, time.perf_counter())
            job.search.start()
            running.append(job)
        generated += step_all(running, policy, verifier, config)
        for job in [j for j in running if j.search.done]:
            running.remove(job)
            record = make_record(job, config)
            correct += record["selections"]["naive"][str(config.n)]["correct"]
            on_record(record)
            done += 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.0f}", acc=f"{correct / done:.2f}")
    bar.close()


def step_all(jobs: list[Job], policy, verifier, config: SearchConfig) -> int:
    """One iteration for every job: all live beams write a step, all are scored, each
    strategy advances. Returns the tokens generated."""
    beams = [(job, beam) for job in jobs for beam in job.search.live]
    if not beams:
        for job in jobs:
            job.search.live = []
        return 0
    results = policy.generate_step(
        [b.seq for _, b in beams],
        [job.sampling for job, _ in beams],
        stop=config.stop,
        max_tokens=config.max_step_tokens,
    )
    before = verifier_tokens(verifier)
    scores = verifier.score([b.vstate for _, b in beams], [r.text for r in results], policy_seqs=[b.seq for _, b in beams])
    verified = verifier_tokens(verifier) - before
    step_tokens = sum(len(r.token_ids) for r in results) or 1
    for (job, beam), result, score in zip(beams, results, scores):
        beam.steps.append(result.text)
        beam.step_scores.append(score)
        beam.aggregate = beam.vstate.aggregate
        beam.tokens += len(result.token_ids)
        beam.last_step_cut = result.finish_reason == "length"
        job.tokens_generated += len(result.token_ids)
        # one verifier call serves every problem: its tokens are shared in proportion
        job.tokens_verified += verified * len(result.token_ids) / step_tokens
        if result.finish_reason == "eos":
            beam.finish = "eos"
        elif len(beam.seq) >= policy.max_model_len:
            beam.finish = "context"
    blocks = policy.stats()["blocks_used"]
    for job in jobs:
        job.peak_blocks = max(job.peak_blocks, blocks)
        if "first_step_scores" not in job.extra:  # the difficulty estimate compute_optimal fits on
            job.extra["first_step_scores"] = [b.step_scores[0] for b in job.search.live]
        job.search.advance()
    return sum(len(r.token_ids) for r in results)


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
