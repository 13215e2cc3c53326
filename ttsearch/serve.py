"""``ttsearch serve``: an OpenAI-compatible chat completions server on FastAPI + uvicorn.

Every request is a search, and all of them share one scheduler run by one engine thread
(``SearchService``): a new request's beams join the running decode batch at the next token
(continuous batching) and a finished one leaves at once. Search settings come in the request
body under ``"search"``, over the server's defaults. The reply is a standard chat completion
whose content is the chosen path's text, with ``usage`` and a ``"ttsearch"`` object (the
answer, every completion with its step scores, the iterations run). A streamed reply sends a
step as soon as it is decided: once every path still in the running (and every answer found)
goes through it; the rest of the chosen path follows when the search ends.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name classes imported inside create_app
import asyncio
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from ttsearch.api import Question, Searcher, SearchResult, question_id
from ttsearch.errors import KVCacheFullError, TTSearchError
from ttsearch.eval.datasets import Problem
from ttsearch.eval.tree import path_to
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.runner import make_job, make_record
from ttsearch.search.scheduler import Job, Scheduler

log = logging.getLogger("ttsearch.serve")


class RequestError(TTSearchError, ValueError):
    """A request that can never be served as asked (HTTP 400)."""


class Busy(TTSearchError, RuntimeError):
    """The server cannot take the request now (HTTP 503): retry later."""


@dataclass(eq=False)
class Ticket:
    """One request in the service: its search, its result to be, and its stream of steps."""

    job: Job
    number: int  # for the log
    future: Future = field(default_factory=Future)
    on_step: Callable[[str], None] | None = None  # called from the engine thread with each decided step
    decided: list[int] = field(default_factory=list)  # node ids of the steps sent so far
    nodes_seen: int = 0  # the tree's size when its decided steps were last looked for


class SearchService:
    """The scheduler every request shares, driven by one engine thread."""

    def __init__(self, searcher: Searcher, max_waiting: int = 256):
        self.searcher = searcher
        self.scheduler = Scheduler(searcher.policy, searcher.verifier)
        self.max_waiting = max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "cancel", ticket) from request threads
        self._waiting: deque[Ticket] = deque()  # accepted, not yet admitted to the batch
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
        prompt over the context length, more beams than the pool can ever hold), ``Busy``
        if too many requests wait already."""
        if len(self._waiting) >= self.max_waiting:
            raise Busy(f"{len(self._waiting)} requests are waiting for the batch already; retry later")
        # the id seeds the search: the same question and settings get the same reply, whenever they come
        problem = Problem(id=question_id(question), question=question, answer=None)
        try:
            job = make_job(problem, config, self.scheduler)
        except (ValueError, TypeError, KVCacheFullError) as exc:  # ContextLengthError is a ValueError
            raise RequestError(str(exc)) from exc
        ticket = Ticket(job, number=next(self._numbers), on_step=on_step)
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Free the request's beams (a client that went away)."""
        if not ticket.future.done():
            self._inbox.put(("cancel", ticket))

    def load(self) -> dict:
        return {"running": len(self.scheduler.running), "preempted": len(self.scheduler.waiting),
                "waiting": len(self._waiting)}

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
        self._admit()
        if not self.scheduler.jobs:
            return
        for job in self.scheduler.step():
            self._finish(self._tickets.pop(id(job)))
        for ticket in self._tickets.values():
            if ticket.on_step is not None:
                self._send_decided(ticket)

    def _take_messages(self, block: bool) -> None:
        try:
            message = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = message
            if kind == "add":
                self._waiting.append(ticket)
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

    def _admit(self) -> None:
        in_flight = self.searcher.config.problems_in_flight
        while self._waiting and len(self.scheduler.jobs) < in_flight:
            ticket = self._waiting[0]
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
        record = make_record(job)
        result = SearchResult.from_record(record, job.problem.question)
        log.info("request %d: %s n=%d, %d prompt tokens, %d generated, %d verified, %.2f s", ticket.number,
                 record["strategy"], record["n"], record["prompt_tokens"], record["tokens_generated"],
                 record["tokens_verified"], record["seconds"])
        # the chosen path's steps not sent yet: the decided ones are a prefix of every answer's path
        for node_id in _chosen_nodes(result)[len(ticket.decided):]:
            if ticket.on_step is not None:
                self._emit(ticket, node_id)
        ticket.future.set_result(result)

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
    return path_to(result.record["completions"][result.chosen]["node"], result.nodes)


# ----------------------------------------------------------------------------- HTTP


def create_app(service: SearchService, model_name: str, api_key: str | None = None):
    """The FastAPI app: GET /health, GET /v1/models, POST /v1/chat/completions."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict
    from starlette.exceptions import HTTPException

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # clients send fields a search has no use for

        model: str | None = None
        messages: list[Message]
        stream: bool = False
        temperature: float | None = None
        top_p: float | None = None
        seed: int | None = None
        max_tokens: int | None = None
        search: dict | None = None

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

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **service.load()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "ttsearch"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        if body.model is not None and body.model != model_name:
            raise HTTPException(404, f"model {body.model!r} is not served here; GET /v1/models lists {model_name!r}")
        overrides = {k: v for k, v in (("temperature", body.temperature), ("top_p", body.top_p), ("seed", body.seed),
                                       ("max_tokens", body.max_tokens)) if v is not None}
        overrides.update(body.search or {})
        messages = [m.model_dump() for m in body.messages]
        try:
            config = service.settings(overrides)
            loop = asyncio.get_running_loop()
            steps: asyncio.Queue = asyncio.Queue()
            on_step = (lambda text: loop.call_soon_threadsafe(steps.put_nowait, text)) if body.stream else None
            ticket = service.submit(messages, config, on_step=on_step)
        except RequestError as exc:
            return error(400, str(exc))
        except Busy as exc:
            raise HTTPException(503, str(exc)) from exc
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return StreamingResponse(_stream(service, ticket, steps, reply_id, created, model_name, request),
                                     media_type="text/event-stream")
        result = await _wait(service, ticket, request)
        if result is None:
            return error(499, "the client closed the request")
        if isinstance(result, BaseException):
            return error(500, f"the search failed: {result}", kind="server_error")
        return _completion(result, reply_id, created, model_name)

    return app


async def _wait(service: SearchService, ticket: Ticket, request) -> SearchResult | BaseException | None:
    """The request's result; None (and its beams freed) if the client goes away first."""
    waiting = asyncio.wrap_future(ticket.future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            try:
                return waiting.result()
            except asyncio.CancelledError:
                return None
            except Exception as exc:
                return exc
        if await request.is_disconnected():
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
    record = result.record
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
            "strategy": record["strategy"],
            "n": record["n"],
            "iterations": result.iterations,
            "completions": [{"text": c.text, "answer": c.answer, "step_scores": c.step_scores,
                             "aggregate": c.aggregate, "finish": c.finish} for c in result.completions],
            **({"early_stop": result.early_stop} if result.early_stop else {}),
        },
    }


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    service = SearchService(searcher).start()
    app = create_app(service, model_name or searcher.policy.name, api_key)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
    finally:
        service.stop()
