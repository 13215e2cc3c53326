"""Problems in, records out: each problem's search on the shared scheduler, graded (when it has
an answer) and recorded.

``run_jobs`` feeds the scheduler (``scheduler.py``) as many problems as ``problems_in_flight``
and the KV pool allow, and hands each finished problem's record to ``on_record`` as soon as
it is done, so a results file grows as the run goes.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Iterable

from tqdm import tqdm

from ttsearch.eval.datasets import Problem
from ttsearch.eval.grading import answer_key, extract_answer, is_equivalent
from ttsearch.eval.selection import SELECTIONS, budgets, select
from ttsearch.search.config import SearchConfig
from ttsearch.search.scheduler import Job, Scheduler, SchedulerStats
from ttsearch.search.strategies import SEARCHES, Strategy

log = logging.getLogger("ttsearch")

#: the date a template that prints one (Llama 3.x) is given, so prompts never change with the day
TEMPLATE_DATE = "26 Jul 2024"


def chat_messages(question: str | list[dict], config: SearchConfig) -> list[dict]:
    """The conversation the policy continues. A plain question gets the system prompt and
    the worked example if configured; chat messages are taken as given, with the system
    prompt in front unless they bring their own."""
    if isinstance(question, str):
        messages = [{"role": "system", "content": config.system_prompt}]
        if config.example_question is not None:
            messages += [
                {"role": "user", "content": config.example_question},
                {"role": "assistant", "content": config.example_solution},
            ]
        return messages + [{"role": "user", "content": question}]
    messages = check_messages(question)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}] + messages
    return messages


def check_messages(messages) -> list[dict]:
    """Chat messages as ``[{"role": ..., "content": str}, ...]`` ending with the user's turn;
    a ValueError names the first message that is not."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}]: expected {{'role': 'system' | 'user' | 'assistant', 'content': str}}, "
                             f"got {m!r:.120}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"messages[{len(out) - 1}]: the last message must be the user's question")
    return out


def question_text(question: str | list[dict]) -> str:
    """What the verifier reads as the question: the text, or the last user turn."""
    return question if isinstance(question, str) else question[-1]["content"]


def build_prompt(tokenizer, question: str | list[dict], config: SearchConfig) -> list[int]:
    """The policy's chat template (or ``config.chat_template``) over ``chat_messages``, with
    its generation prompt."""
    messages = chat_messages(question, config)
    template = config.chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True, date_string=TEMPLATE_DATE
        )
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode("\n\n".join(m["content"] for m in messages) + "\n\n")


def problem_seed(seed: int, problem_id: str) -> int:
    """A problem's random stream depends on the run seed and its id, not on its batch."""
    return (seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (1 << 62)


def make_search(problem: Problem, policy, verifier, config: SearchConfig) -> Strategy:
    prompt_ids = build_prompt(policy.tokenizer, problem.question, config)
    seed = problem_seed(config.seed, problem.id)
    return SEARCHES[config.strategy](policy, verifier, config, prompt_ids, question_text(problem.question), seed=seed)


def make_job(problem: Problem, config: SearchConfig, scheduler: Scheduler) -> Job:
    """A problem's search, checked against the pools before its first token: one whose
    prompt and first beams cannot fit even alone raises ``KVCacheFullError`` here."""
    search = make_search(problem, scheduler.policy, scheduler.verifier, config)
    scheduler.check_fits_alone(search, problem.id)
    return Job(problem, search, config.sampling(problem_seed(config.seed, problem.id)))


def run_jobs(
    items: Iterable[tuple[Problem, SearchConfig]],
    policy,
    verifier,
    on_record: Callable[[dict], None] | None = None,
    settings: dict | None = None,
    progress: bool = True,
    on_step: Callable[[Problem, dict], None] | None = None,
    on_job: Callable[[Job, dict], None] | None = None,
) -> SchedulerStats:
    """Search every (problem, config) pair, as many at once as ``problems_in_flight`` and the
    KV pool allow. Every problem's prompt is checked against the pool before the first
    token: one that cannot fit even alone fails the run up front. ``on_step(problem, node)``
    sees every scored step as it happens (a node of the record's tree). Each finished problem's
    record goes to ``on_record``, and with its job to ``on_job``."""
    scheduler = Scheduler(policy, verifier, on_step=None if on_step is None else
                          (lambda job, node: on_step(job.problem, node)))
    pending = [make_job(problem, config, scheduler) for problem, config in items]
    if not pending:
        return scheduler.stats
    in_flight = max(job.search.config.problems_in_flight for job in pending)
    bar = tqdm(total=len(pending), desc=pending[0].search.config.strategy, unit="problem", disable=not progress)
    correct = done = 0
    started = time.perf_counter()
    while pending or scheduler.jobs:
        while pending and len(scheduler.jobs) < in_flight:
            pending[0].started = time.perf_counter()
            if not scheduler.add(pending[0]):
                break  # the KV pool is full: admit it when a running problem has finished
            pending.pop(0)
        for job in scheduler.step():
            record = make_record(job, settings)
            if on_record is not None:
                on_record(record)
            if on_job is not None:
                on_job(job, record)
            log.info("problem %s (%s, n=%d): %d tokens generated, %d verified, %.2f s", record["id"],
                     record["strategy"], record["n"], record["tokens_generated"], record["tokens_verified"],
                     record["seconds"])
            correct += bool(record["selections"]["naive"][str(job.search.config.n)].get("correct"))
            done += 1
            bar.update(1)
            tok_s = scheduler.generated / (time.perf_counter() - started)
            bar.set_postfix(tok_s=f"{tok_s:.0f}", acc=f"{correct / done:.2f}")
    bar.close()
    return scheduler.stats


def selection_budgets(search: Strategy) -> list[int]:
    """The budgets N a record selects at: every N for a strategy whose first N answers are
    what n=N would give (best-of-N; DVTS as a subsampled curve, labelled so in reports); the
    other strategies, and any run that stops early, only at their own n, since a smaller N is
    another search."""
    config = search.config
    return budgets(config.n) if search.selects_every_budget and not config.stops_early else [config.n]


def make_record(job: Job, settings: dict | None = None) -> dict:
    """A finished search as one JSON-able record; graded against the problem's answer when
    it has one (a question asked through the API or the server has none)."""
    problem, search = job.problem, job.search
    config = search.config
    graded = problem.answer is not None

    def grade(answer: str | None) -> dict:
        return {"correct": answer is not None and is_equivalent(answer, problem.answer)} if graded else {}

    completions = []
    for beam in search.answers:
        answer = extract_answer(beam.text)
        completions.append({"text": beam.text, "step_scores": beam.step_scores, "aggregate": beam.aggregate,
                            "finish": beam.finish, "node": beam.node, "answer": answer, **grade(answer)})
    selections = {}
    for method in SELECTIONS:
        selections[method] = {}
        for n in selection_budgets(search):
            chosen = select([(c["answer"], c["aggregate"]) for c in completions[:n]], method, key=answer_key)
            selections[method][str(n)] = {"answer": chosen, **grade(chosen)}
    record = {
        "id": problem.id,
        "question": problem.question,
        "reference": problem.answer,
        "level": problem.level,
        "strategy": config.strategy,
        "n": config.n,
        "beam_width": config.beam_width,
        "rules": config.rules(),
        "completions": completions,
        "finished": len(search.completions),
        "unfinished": len(search.unfinished),
        "iterations": search.iteration,
        "selections": selections,
        "prompt_tokens": len(search.prompt_ids),
        "tokens_generated": job.tokens_generated,
        "tokens_verified": job.tokens_verified,
        "peak_kv_blocks": job.peak_blocks,
        "preemptions": job.preemptions,
        "seconds": round(time.perf_counter() - job.started, 3),
        "first_step_scores": search.first_step_scores(),
        "nodes": search.nodes,
    }
    if search.early_stop is not None:
        record["early_stop"] = search.early_stop
    record.update(search.record_fields())
    if settings is not None:
        record["settings"] = settings
    return record
