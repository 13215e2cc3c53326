"""``ttsearch serve``: an OpenAI-compatible server on FastAPI + uvicorn, for whole searches, plain
generation and step scoring, all on one engine.

One engine thread (``SearchService``) drives one scheduler for every request, so everything
shares one decode batch and one KV pool:

- a search request (a body with a ``"search"`` object, or any chat request when the server
  runs with ``search_by_default``) runs the whole tree in the engine. The reply is a chat
  completion whose content is the chosen path's text, with ``usage`` and a ``"ttsearch"``
  object (the answer, every completion with its step scores, the iterations run). A streamed
  reply sends a step as soon as it is decided: once every path still in the running (and
  every answer found) goes through it; the rest of the chosen path follows at the end;
- a generation request (any other request to ``/v1/chat/completions`` or ``/v1/completions``)
  is served with vLLM's semantics (``openai_protocol.py``): its ``n`` choices join the running
  decode batch, and its prompt reuses the prefix cache, so a client that re-sends a path grown
  by one step pays only for the new tokens (``usage.prompt_tokens_details.cached_tokens``);
- ``POST /v1/score_steps`` scores posted paths with the server's verifier between two decode
  steps, incrementally (``verifiers/path_scorer.py``).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name classes imported inside create_app
import asyncio
import itertools
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ttsearch.api import Question, Searcher, question_id
from ttsearch.errors import KVCacheFullError, TTSearchError
from ttsearch.eval.datasets import Problem
from ttsearch.eval.tree import path_to
from ttsearch import openai_protocol as protocol
from ttsearch.openai_protocol import ChatRequest, CompletionRequest, Delta, RequestError, ScoreStepsRequest
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.generation import Generation, GenerationParams
from ttsearch.search.result import SearchResult, search_result
from ttsearch.search.runner import make_job
from ttsearch.search.scheduler import Job, Scheduler
from ttsearch.verifiers.path_scorer import PathScorer, ScoredPaths

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
    stream: "GenerationStream | None" = None  # a streamed generation's progress

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
    def start(self) -> "SearchService":
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


# ----------------------------------------------------------------------------- HTTP


def create_app(service: SearchService, model_name: str, api_key: str | None = None, search_by_default: bool = False):
    """The FastAPI app: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions
    and /v1/score_steps. ``search_by_default``: a chat request without a ``"search"`` object is
    searched with the server's settings (otherwise it is a generation request)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    policy = service.searcher.policy
    app = FastAPI(title="ttsearch", version="1")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(RequestValidationError)
    async def bad_body(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kinds = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}
        return error(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "invalid_request_error"))

    async def authorized(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise HTTPException(404, f"model {name!r} is not served here; GET /v1/models lists {model_name!r}")

    @app.get("/health")
    async def health():
        # totals: requests and tokens since the start; tokens_forwarded: every token the engine's forwards wrote
        return {"status": "ok", "model": model_name, **service.load(), "totals": dict(service.totals),
                "tokens_forwarded": policy.tokens_forwarded}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ttsearch",
                                            "max_model_len": policy.max_model_len}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        if body.search is not None or search_by_default:
            return await search(body, request)
        try:
            prompt = protocol.chat_prompt(policy.tokenizer, body)
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            params = protocol.generation_params(body, len(prompt), policy.max_model_len, max_tokens,
                                                protocol.chat_logprobs_count(body), _seed(body.seed))
        except RequestError as exc:
            return error(400, str(exc))
        return await generate(request, body, [(prompt, None)], params, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        try:
            if (body.model_extra or {}).get("search") is not None:
                raise RequestError("search: searches are served by /v1/chat/completions")
            prompts = protocol.completion_prompts(policy.tokenizer, policy.config.vocab_size, body)
            logprobs = protocol.completion_logprobs_count(body)
            params = [protocol.generation_params(body, len(ids), policy.max_model_len, body.max_tokens, logprobs,
                                                 _seed(body.seed)) for ids, _ in prompts]
        except RequestError as exc:
            return error(400, str(exc))
        echoes = [text if body.echo else None for _, text in prompts]
        return await generate(request, body, list(zip([ids for ids, _ in prompts], echoes)), params, chat=False)

    @app.post("/v1/score_steps", dependencies=[Depends(authorized)])
    async def score_steps(body: ScoreStepsRequest):
        check_model(body.model)
        try:
            future = service.score_paths(body.question, body.paths)
        except RequestError as exc:
            return error(400, str(exc))
        except Busy as exc:
            raise HTTPException(503, str(exc)) from exc
        try:
            scored: ScoredPaths = await asyncio.wrap_future(future)
        except RequestError as exc:
            return error(400, str(exc))
        except Busy as exc:
            raise HTTPException(503, str(exc)) from exc
        except Exception as exc:
            return error(500, f"scoring failed: {exc}", kind="server_error")
        return {
            "id": f"score-{uuid.uuid4().hex}", "object": "score_steps", "created": int(time.time()),
            "model": model_name,
            "data": [{"index": i, "step_scores": scores, "aggregate": aggregate}
                     for i, (scores, aggregate) in enumerate(zip(scored.step_scores, scored.aggregates))],
            "usage": {"steps": scored.steps_scored + scored.steps_remembered, "steps_scored": scored.steps_scored,
                      "steps_remembered": scored.steps_remembered, "verifier_tokens": scored.verifier_tokens},
        }

    async def search(body: ChatRequest, request: Request):
        try:
            overrides = _search_settings(body)
            config = service.settings(overrides)
            loop = asyncio.get_running_loop()
            steps: asyncio.Queue = asyncio.Queue()
            on_step = (lambda text: loop.call_soon_threadsafe(steps.put_nowait, text)) if body.stream else None
            ticket = service.submit(body.plain_messages(), config, on_step=on_step)
        except RequestError as exc:
            return error(400, str(exc))
        except Busy as exc:
            raise HTTPException(503, str(exc)) from exc
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream(service, ticket, steps, reply_id, created, model_name, request),
                                     media_type="text/event-stream")
        result = await _wait(service, [ticket], request)
        if result is None:
            return error(499, "the client closed the request")
        if isinstance(result, BaseException):
            return error(500, f"the search failed: {result}", kind="server_error")
        return _completion(result[0], reply_id, created, model_name)

    async def generate(request: Request, body, prompts: list[tuple[list[int], str | None]],
                       params: GenerationParams | list[GenerationParams], chat: bool):
        """One generation per prompt (a completions request may send several); choice i of
        prompt p is choice p * n + i of the reply."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        n = per_prompt[0].n
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue | None = asyncio.Queue() if body.stream else None
        tickets = []
        try:
            for p, ((ids, _), prompt_params) in enumerate(zip(prompts, per_prompt)):
                on_deltas = None
                if deltas is not None:
                    def on_deltas(batch, base=p * n):
                        loop.call_soon_threadsafe(deltas.put_nowait, [(base, d) for d in batch])
                tickets.append(service.submit_generation(ids, prompt_params, on_deltas=on_deltas))
        except (RequestError, Busy) as exc:
            for ticket in tickets:
                service.cancel(ticket)
            if isinstance(exc, Busy):
                raise HTTPException(503, str(exc)) from exc
            return error(400, str(exc))
        reply_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": model_name}
        if deltas is not None:
            return StreamingResponse(_stream_generation(service, tickets, deltas, head, prompts, n, chat, body,
                                                        policy.tokenizer, request), media_type="text/event-stream")
        results = await _wait(service, tickets, request)
        if results is None:
            return error(499, "the client closed the request")
        if isinstance(results, BaseException):
            return error(500, f"the generation failed: {results}", kind="server_error")
        choices, outputs = [], []
        for p, (generation, (_, echo)) in enumerate(zip(results, prompts)):
            for choice in generation.choices:
                output = generation.output(choice)
                outputs.append(output)
                choices.append(protocol.chat_choice(policy.tokenizer, p * n + choice.index, output) if chat else
                               protocol.completion_choice(policy.tokenizer, p * n + choice.index, output, echo))
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(results, outputs)}

    return app


def _seed(seed: int | None) -> int:
    """A request's seed; an unseeded request draws its own, so that repeated requests differ."""
    return seed if seed is not None else secrets.randbits(62)


def _search_settings(body) -> dict:
    """A search request's settings: the body's ``search`` object over the sampling fields it
    shares with generation; generation-only fields would change what is asked and are refused."""
    body.check_fields()
    for name, default in (("n", 1), ("stop", None), ("logprobs", False), ("top_logprobs", None),
                          ("continue_final_message", False), ("add_generation_prompt", True),
                          ("include_stop_str_in_output", False)):
        if getattr(body, name) != default:
            raise RequestError(f"{name}={getattr(body, name)!r}: applies to generation requests, not to a search "
                               "(a search's own settings go in its \"search\" object, e.g. search.n)")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p), ("top_k", body.top_k),
                                   ("seed", body.seed), ("max_tokens", max_tokens)) if v is not None}
    overrides.update(body.search or {})
    return overrides


def _usage(generations: list[Generation], outputs) -> dict:
    return protocol.usage(sum(len(g.prompt_ids) for g in generations), sum(g.cached_tokens for g in generations),
                 sum(len(o.token_ids) for o in outputs))


async def _stream_generation(service: SearchService, tickets: list[Ticket], deltas: asyncio.Queue, head: dict,
                             prompts, n: int, chat: bool, body, tokenizer, request):
    """Server-sent events in OpenAI's chunk format: each choice's deltas as they are written,
    then (with ``stream_options.include_usage``) the usage, then ``[DONE]``. A client that
    hangs up is noticed within a quarter second (as in ``_stream``)."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    futures = [asyncio.wrap_future(t.future) for t in tickets]
    open_choices = len(tickets) * n
    try:
        for p, (_, echo) in enumerate(prompts):
            for i in range(n):
                if chat:
                    yield chunk([{"index": p * n + i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                elif echo:
                    yield chunk([{"index": p * n + i, "text": echo, "logprobs": None, "finish_reason": None}])
        while open_choices:
            getter = asyncio.ensure_future(deltas.get())
            done = set()
            while not done:
                done, _ = await asyncio.wait({getter, *[f for f in futures if not f.done()]}, timeout=0.25,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done and await request.is_disconnected():
                    getter.cancel()
                    return  # the finally below frees its choices
            if not getter.done():
                getter.cancel()
                failed = next((f for f in futures if f.done() and (f.cancelled() or f.exception())), None)
                if failed is not None:
                    reason = "cancelled" if failed.cancelled() else failed.exception()
                    message = {"error": {"message": f"the generation failed: {reason}", "type": "server_error"}}
                    yield f"data: {json.dumps(message)}\n\n"
                    return
                continue  # a generation ended: its last deltas are on their way
            for base, delta in getter.result():
                delta.index += base
                choice = (protocol.chat_chunk_choice if chat else protocol.completion_chunk_choice)(tokenizer, delta)
                yield chunk([choice])
                open_choices -= delta.finish_reason is not None
        if body.stream_options is not None and body.stream_options.include_usage:
            results = [await f for f in futures]  # set just after their last deltas were queued
            outputs = [g.output(c) for g in results for c in g.choices]
            yield chunk([], usage=_usage(results, outputs))
        yield "data: [DONE]\n\n"
    finally:
        for ticket in tickets:
            service.cancel(ticket)  # a client gone mid-stream: its choices are freed (no-op once done)


async def _wait(service: SearchService, tickets: list[Ticket], request) -> list | BaseException | None:
    """The requests' results in order (the first failure, if any); None (and every ticket
    cancelled) if the client goes away first."""
    waiting = [asyncio.wrap_future(t.future) for t in tickets]
    while True:
        done, _ = await asyncio.wait(set(waiting), timeout=0.25, return_when=asyncio.FIRST_EXCEPTION)
        if len(done) == len(waiting) or any(f.cancelled() or f.exception() for f in done):
            for ticket in tickets:
                service.cancel(ticket)  # the others of a request that failed (no-op once done)
            try:
                return [f.result() for f in waiting]
            except asyncio.CancelledError:
                return None
            except Exception as exc:
                return exc
        if await request.is_disconnected():
            for ticket in tickets:
                service.cancel(ticket)
            return None


async def _stream(service: SearchService, ticket: Ticket, steps: asyncio.Queue, reply_id: str, created: int,
                  model: str, request):
    """Server-sent events in OpenAI's chunk format: the role, each decided step, the end. A
    client that hangs up is noticed within a quarter second, not only at the next chunk's
    write, which may be many steps away."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    waiting = asyncio.wrap_future(ticket.future)
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            getter = asyncio.ensure_future(steps.get())
            done = set()
            while not done:
                done, _ = await asyncio.wait({getter, waiting}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                if not done and await request.is_disconnected():
                    getter.cancel()
                    return  # the finally below frees its beams
            if getter in done:
                yield chunk({"content": getter.result()})
                continue
            getter.cancel()
            while not steps.empty():  # the chosen path's last steps, queued before the result
                yield chunk({"content": steps.get_nowait()})
            break
        try:
            result = waiting.result()
        except Exception as exc:
            yield f"data: {json.dumps({'error': {'message': f'the search failed: {exc}', 'type': 'server_error'}})}\n\n"
            return
        reply = _completion(result, reply_id, created, model)
        yield chunk({}, reply["choices"][0]["finish_reason"], usage=reply["usage"], ttsearch=reply["ttsearch"])
        yield "data: [DONE]\n\n"
    finally:
        service.cancel(ticket)  # a client gone mid-stream: its beams are freed (no-op once done)


def _completion(result: SearchResult, reply_id: str, created: int, model: str) -> dict:
    chosen = result.completions[result.chosen] if result.chosen is not None else None
    finish = "length" if chosen is not None and chosen.finish == "length" else "stop"
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text or ""},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens_generated,
                  "total_tokens": result.prompt_tokens + result.tokens_generated,
                  "verifier_tokens": result.tokens_verified},
        "ttsearch": {
            "answer": result.answer,
            "selections": result.selections,
            "strategy": result.strategy,
            "n": result.n,
            "iterations": result.iterations,
            "completions": [{"text": c.text, "answer": c.answer, "step_scores": c.step_scores,
                             "aggregate": c.aggregate, "finish": c.finish} for c in result.completions],
            **({"early_stop": result.early_stop} if result.early_stop else {}),
        },
    }


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info", search_by_default: bool = False) -> None:
    """Run the server until interrupted."""
    import uvicorn

    service = SearchService(searcher).start()
    app = create_app(service, model_name or searcher.policy.name, api_key, search_by_default=search_by_default)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        service.stop()
