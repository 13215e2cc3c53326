"""The service behind ``ttsearch serve``: one engine thread owns the scheduler and runs every
request (searches, generations, step scoring) in one decode batch and one KV pool. Request
threads hand it work through ``submit``, ``submit_generation`` and ``score_paths`` and wait on
the ticket's future; streamed requests get their steps or deltas through a callback.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ttsearch.api import Question, Searcher, question_id
from ttsearch.errors import KVCacheFullError, TTSearchError
from ttsearch.eval.datasets import Problem
from ttsearch.eval.tree import path_to
from ttsearch.openai_protocol import Delta, RequestError
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.generation import Generation, GenerationParams
from ttsearch.search.result import SearchResult, search_result
from ttsearch.search.runner import make_job
from ttsearch.search.scheduler import Job, Scheduler
from ttsearch.verifiers.path_scorer import PathScorer

log = logging.getLogger("ttsearch.serve")


class Busy(TTSearchError, RuntimeError):
    """The server cannot take the request now (HTTP 503): retry later."""


@dataclass(eq=False)
class Ticket:
    """One request in the service: its search or generation, its result to be, and its stream."""

    job: Job
    number: int  # for the log
    future: Future = field(default_factory=Future)
    # called from the engine thread: a search's each decided step (str), a generation's deltas (list[Delta])
    on_step: Callable | None = None
    decided: list[int] = field(default_factory=list)  # a search's node ids of the steps sent so far
    nodes_seen: int = 0  # the tree's size when its decided steps were last looked for
    stream: GenerationStream | None = None  # a streamed generation's progress

    @property
    def generation(self) -> bool:
        return not self.job.search.scored


class GenerationStream:
    """What a streamed generation has sent of each choice, and what to send next (engine
    thread). Text that may be the start of a stop string, or an unfinished character, is held
    back until the next tokens tell."""

    def __init__(self, generation: Generation, tokenizer):
        self.generation = generation
        self.tokenizer = tokenizer
        n = generation.params.n
        self.text, self.tokens, self.ended = [""] * n, [0] * n, [False] * n

    def deltas(self, writer) -> list[Delta]:
        out = []
        wants_logprobs = self.generation.params.logprobs is not None
        for choice in self.generation.choices:
            i = choice.index
            if self.ended[i]:
                continue
            finish = stop_reason = None
            if choice.result is not None:
                output = self.generation.output(choice)
                text, tokens, logprobs = output.text, output.token_ids, output.logprobs
                finish, stop_reason = output.finish_reason, output.stop_reason
                self.ended[i] = True
            else:
                step = writer.progress(choice.seq)
                if step is None or len(step.written) == self.tokens[i]:
                    continue
                tokens, logprobs = step.written, step.logprobs
                text = self._safe(self.tokenizer.decode(tokens, skip_special_tokens=True))
                if len(text) <= len(self.text[i]) or not text.startswith(self.text[i]):
                    continue  # nothing new to show yet: its tokens go with the next delta
            new = text[len(self.text[i]):] if text.startswith(self.text[i]) else ""
            out.append(Delta(i, new, tokens[self.tokens[i]:], logprobs[self.tokens[i]:] if wants_logprobs else None,
                             finish, stop_reason))
            self.text[i] += new
            self.tokens[i] = len(tokens)
        return out

    def _safe(self, text: str) -> str:
        held = 1 if text.endswith("\ufffd") else 0  # a character still missing bytes
        for stop in self.generation.params.stop:
            held = max(held, next((k for k in range(min(len(stop) - 1, len(text)), 0, -1)
                                   if text.endswith(stop[:k])), 0))
        return text[: len(text) - held]


class SearchService:
    """The scheduler every request shares, driven by one engine thread."""

    def __init__(self, searcher: Searcher, max_waiting: int = 256):
        self.searcher = searcher
        self.scheduler = Scheduler(searcher.policy, searcher.verifier)
        self.scorer = PathScorer(searcher.verifier)
        self.max_waiting = max_waiting
        self.totals: Counter = Counter()  # requests and tokens since the start (GET /health)
        # ("add" | "cancel", ticket) and ("score", (question, paths, future)) from request threads
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Ticket] = deque()  # accepted, not yet admitted to the batch
        self._scoring: deque = deque()  # score requests for the engine thread
        self._tickets: dict[int, Ticket] = {}  # id(job) -> ticket, while admitted
        self._numbers = itertools.count(1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ttsearch-engine", daemon=True)

    # ------------------------------------------------------------------ request threads
    def start(self) -> SearchService:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def settings(self, overrides: dict | None) -> SearchConfig:
        try:
            return self.searcher.settings(**(overrides or {}))
        except ConfigError as exc:
            raise RequestError(str(exc)) from exc

    def submit(self, question: Question, config: SearchConfig,
               on_step: Callable[[str], None] | None = None) -> Ticket:
        """Accept a search: ``RequestError`` if it can never run as asked (bad messages, a
        prompt over the context length, ``max_tokens`` past it, more beams than the pool can
        ever hold), ``Busy`` if too many requests wait already."""
        self._check_queue()
        # the id seeds the search: the same question and settings get the same reply, whenever they come
        problem = Problem(id=question_id(question), question=question, answer=None)
        try:
            job = make_job(problem, config, self.scheduler)
        except (ValueError, TypeError, KVCacheFullError) as exc:  # ContextLengthError is a ValueError
            raise RequestError(str(exc)) from exc
        prompt, room = len(job.search.prompt_ids), self.searcher.policy.max_model_len
        if prompt + config.max_tokens > room:
            raise RequestError(f"max_tokens={config.max_tokens}: past the context length {room} after the "
                               f"{prompt}-token prompt (at most {room - prompt})")
        ticket = Ticket(job, number=next(self._numbers), on_step=on_step)
        self._inbox.put(("add", ticket))
        return ticket

    def submit_generation(self, prompt_ids: list[int], params: GenerationParams,
                          on_deltas: Callable[[list[Delta]], None] | None = None) -> Ticket:
        """Accept a generation (``params`` checked against the context already): ``RequestError``
        if its prompt and choices can never fit in the KV pool, ``Busy`` if too many requests
        wait already."""
        self._check_queue()
        policy = self.searcher.policy
        blocks = -(-len(prompt_ids) // policy.block_size) + params.n  # the prompt, and a block per choice
        if blocks > policy.blocks.num_blocks:
            raise RequestError(f"n={params.n}: {params.n} choices of a {len(prompt_ids)}-token prompt need at least "
                               f"{blocks} blocks of the KV pool's {policy.blocks.num_blocks}; lower n")
        number = next(self._numbers)
        generation = Generation(policy, prompt_ids, params)
        job = Job(Problem(id=f"generation-{number}", question=None, answer=None), generation, params.sampling)
        ticket = Ticket(job, number, on_step=on_deltas,
                        stream=GenerationStream(generation, policy.tokenizer) if on_deltas else None)
        self._inbox.put(("add", ticket))
        return ticket

    def score_paths(self, question: str, paths: list[list[str]]) -> Future:
        """Score every step of ``paths`` with the server's verifier, on the engine thread
        between two decode steps; the future holds ``ScoredPaths``."""
        self._check_queue()
        try:
            self.scorer.check(question, paths)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        future: Future = Future()
        self._inbox.put(("score", (question, paths, future)))
        return future

    def _check_queue(self) -> None:
        waiting = len(self._waiting) + len(self._scoring)
        if waiting >= self.max_waiting:
            raise Busy(f"{waiting} requests are waiting for the batch already; retry later")

    def cancel(self, ticket: Ticket) -> None:
        """Free the request's beams (a client that went away)."""
        if not ticket.future.done():
            self._inbox.put(("cancel", ticket))

    def load(self) -> dict:
        # "waiting" counts what the engine thread has not taken from its inbox yet: a request
        # answered with a first chunk may not have reached the scheduler
        return {"running": len(self.scheduler.running), "preempted": len(self.scheduler.waiting),
                "waiting": len(self._waiting) + len(self._scoring) + self._inbox.qsize()}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception as exc:  # a failed step fails the requests in flight, not the server
                log.exception("a search step failed; failing the %d requests in flight", len(self._tickets))
                for ticket in list(self._tickets.values()):
                    self._drop(ticket, exc)

    def _iterate(self) -> None:
        self._take_messages(block=not (self.scheduler.jobs or self._waiting))
        self._score_waiting()
        self._admit()
        if not self.scheduler.jobs:
            return
        for job in self.scheduler.step():
            self._finish(self._tickets.pop(id(job)))
        for ticket in self._tickets.values():
            if ticket.on_step is not None:
                self._send(ticket)

    def _take_messages(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = message
            if kind == "add":
                self._waiting.append(ticket)
            elif kind == "score":
                self._scoring.append(ticket)
            elif kind == "cancel" and not ticket.future.done():
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                else:
                    self.scheduler.cancel(ticket.job)
                    self._tickets.pop(id(ticket.job), None)
                ticket.future.cancel()
                log.info("request %d cancelled: its beams are freed", ticket.number)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _score_waiting(self) -> None:
        while self._scoring:
            question, paths, future = self._scoring.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                scored = self.scorer.score(question, paths)
            except KVCacheFullError as exc:  # the verifier's pool is held by the running requests
                future.set_exception(Busy(f"the verifier's KV pool is full now; retry later ({exc})") if
                                     self.scheduler.jobs else RequestError(f"the paths do not fit in the verifier's "
                                                                           f"KV pool: {exc}"))
            except ValueError as exc:  # e.g. a step its format cannot write
                future.set_exception(RequestError(str(exc)))
            except Exception as exc:
                log.exception("scoring %d paths failed", len(paths))
                future.set_exception(exc)
            else:
                self.totals.update(score_requests=1, steps_scored=scored.steps_scored,
                                   steps_remembered=scored.steps_remembered, verifier_tokens=scored.verifier_tokens)
                future.set_result(scored)

    def _admit(self) -> None:
        in_flight = self.searcher.config.problems_in_flight
        while self._waiting:
            ticket = self._waiting[0]
            # problems_in_flight bounds the searches; a generation needs only room in the pool
            if not ticket.generation and sum(j.search.scored for j in self.scheduler.jobs) >= in_flight:
                return
            ticket.job.started = time.perf_counter()
            try:
                if not self.scheduler.add(ticket.job):
                    return  # the pool is full: it joins when a running search has finished
            except Exception as exc:
                self._waiting.popleft()
                self._drop(ticket, exc, admitted=False)
                continue
            self._waiting.popleft()
            self._tickets[id(ticket.job)] = ticket

    def _drop(self, ticket: Ticket, exc: BaseException, admitted: bool = True) -> None:
        if admitted:
            self._tickets.pop(id(ticket.job), None)
            try:
                self.scheduler.cancel(ticket.job)
            except Exception:
                log.exception("request %d: its beams could not be freed", ticket.number)
        if not ticket.future.done():
            ticket.future.set_exception(exc)

    def _emit(self, ticket: Ticket, node_id: int) -> None:
        """Send a step to the request's stream; a stream that cannot take it (its client is
        gone) gets no more, and the cancel on its way frees the search."""
        try:
            ticket.on_step(ticket.job.search.nodes[node_id]["text"])
        except Exception:
            log.warning("request %d: its stream is closed", ticket.number)
            ticket.on_step = None

    def _finish(self, ticket: Ticket) -> None:
        job = ticket.job
        if ticket.generation:
            generation = job.search
            if ticket.on_step is not None:
                self._send(ticket)  # the choices' last deltas
            prompt = len(generation.prompt_ids)
            self.totals.update(generation_requests=1, prompt_tokens=prompt, cached_tokens=generation.cached_tokens,
                               generated_tokens=job.tokens_generated)
            log.info("request %d: generation n=%d, %d prompt tokens (%d cached), %d generated, %.2f s", ticket.number,
                     generation.params.n, prompt, generation.cached_tokens, job.tokens_generated,
                     time.perf_counter() - job.started)
            ticket.future.set_result(generation)
            return
        result = search_result(job)
        log.info("request %d: %s n=%d, %d prompt tokens, %d generated, %d verified, %.2f s", ticket.number,
                 result.strategy, result.n, result.prompt_tokens, result.tokens_generated, result.tokens_verified,
                 result.seconds)
        self.totals.update(search_requests=1, generated_tokens=job.tokens_generated,
                           verifier_tokens=job.tokens_verified)
        # the chosen path's steps not sent yet: the decided ones are a prefix of every answer's path
        for node_id in _chosen_nodes(result)[len(ticket.decided):]:
            if ticket.on_step is not None:
                self._emit(ticket, node_id)
        ticket.future.set_result(result)

    def _send(self, ticket: Ticket) -> None:
        if not ticket.generation:
            self._send_decided(ticket)
            return
        deltas = ticket.stream.deltas(self.scheduler.writer)
        if deltas:
            try:
                ticket.on_step(deltas)
            except Exception:
                log.warning("request %d: its stream is closed", ticket.number)
                ticket.on_step = None

    def _send_decided(self, ticket: Ticket) -> None:
        nodes = len(ticket.job.search.nodes)
        if nodes == ticket.nodes_seen:  # no step scored since: nothing new can be decided
            return
        ticket.nodes_seen = nodes
        for node_id in decided_nodes(ticket.job.search)[len(ticket.decided):]:
            if ticket.on_step is None:
                return
            ticket.decided.append(node_id)
            self._emit(ticket, node_id)


def decided_nodes(search) -> list[int]:
    """The steps every open path and every answer found so far goes through, from the first:
    no later decision can take them back, so a stream may send them."""
    ends = [b.node for b in search.held() if not b.rollout] + [b.node for b in search.completions]
    if not ends or any(node is None for node in ends):
        return []
    paths = [path_to(node, search.nodes) for node in ends]
    common = 0
    while all(len(p) > common and p[common] == paths[0][common] for p in paths):
        common += 1
    return paths[0][:common]


def _chosen_nodes(result: SearchResult) -> list[int]:
    """The node ids of the chosen path (empty when nothing was chosen)."""
    if result.chosen is None:
        return []
    return path_to(result.completions[result.chosen].node, result.nodes)
