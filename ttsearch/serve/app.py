"""The HTTP layer of ``ttsearch serve``: the FastAPI routes, their replies in OpenAI's formats,
and server-sent events for streamed ones. The work is the service's (``service.py``).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
# name classes imported inside create_app
import asyncio
import json
import secrets
import time
import uuid

from ttsearch import openai_protocol as protocol
from ttsearch.api import Searcher
from ttsearch.openai_protocol import ChatRequest, CompletionRequest, PoolingRequest, RequestError, ScoreStepsRequest
from ttsearch.search.generation import Generation, GenerationParams
from ttsearch.search.result import SearchResult
from ttsearch.serve.service import Busy, SearchService, Ticket
from ttsearch.verifiers.path_scorer import ScoredPaths


def create_app(service: SearchService, model_name: str, api_key: str | None = None, search_by_default: bool = False):
    """The FastAPI app: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions,
    /v1/score_steps and /pooling (also at /v1/pooling). ``search_by_default``: a chat request
    without a ``"search"`` object is searched with the server's settings (otherwise it is a
    generation request)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    policy = service.searcher.policy
    app = FastAPI(title="ttsearch", version="1")

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": None}})

    def bad_request(exc: RequestError):
        return error(400, str(exc), param=exc.param)

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
            return bad_request(exc)
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
            return bad_request(exc)
        echoes = [text if body.echo else None for _, text in prompts]
        return await generate(request, body, list(zip([ids for ids, _ in prompts], echoes)), params, chat=False)

    async def scored(requests: list[tuple[str, list[list[str]]]]):
        """Each (question, paths) scored by the service (``score_paths``), in order, or the
        error reply for the first that cannot be."""
        futures = []
        try:
            for question, paths in requests:
                futures.append(service.score_paths(question, paths))
        except RequestError as exc:
            return bad_request(exc)
        except Busy as exc:
            raise HTTPException(503, str(exc)) from exc
        results = await asyncio.gather(*[asyncio.wrap_future(f) for f in futures], return_exceptions=True)
        exc = next((r for r in results if isinstance(r, BaseException)), None)
        if isinstance(exc, RequestError):
            return bad_request(exc)
        if isinstance(exc, Busy):
            raise HTTPException(503, str(exc)) from exc
        if exc is not None:
            return error(500, f"scoring failed: {exc}", kind="server_error")
        return results

    @app.post("/v1/score_steps", dependencies=[Depends(authorized)])
    async def score_steps(body: ScoreStepsRequest):
        check_model(body.model)
        results = await scored([(body.question, body.paths)])
        if not isinstance(results, list):
            return results
        scored_paths: ScoredPaths = results[0]
        return {
            "id": f"score-{uuid.uuid4().hex}", "object": "score_steps", "created": int(time.time()),
            "model": model_name,
            "data": [{"index": i, "step_scores": scores, "aggregate": aggregate}
                     for i, (scores, aggregate) in enumerate(zip(scored_paths.step_scores, scored_paths.aggregates))],
            "usage": {"steps": scored_paths.steps_scored + scored_paths.steps_remembered,
                      "steps_scored": scored_paths.steps_scored, "steps_remembered": scored_paths.steps_remembered,
                      "verifier_tokens": scored_paths.verifier_tokens},
        }

    @app.post("/pooling", dependencies=[Depends(authorized)])
    @app.post("/v1/pooling", dependencies=[Depends(authorized)])
    async def pooling(body: PoolingRequest):
        """vLLM's reward-model pooling: per input, one ``[p_bad, p_good]`` pair per step tag, as
        Qwen2.5-Math-PRM's STEP pooler orders its two classes (index 1 = the step is good).
        ``p_good`` is the score /v1/score_steps gives the same step: the same service path
        scores it, on the verifier's KV tree, remembering what earlier requests scored."""
        check_model(body.model)
        try:
            texts = protocol.pooling_texts(service.scorer.verifier, body)
        except RequestError as exc:
            return bad_request(exc)
        groups: dict[str, list[int]] = {}  # question -> its inputs: paths of one question share a tree
        for i, text in enumerate(texts):
            groups.setdefault(text.question, []).append(i)
        results = await scored([(question, [texts[i].steps for i in members]) for question, members in groups.items()])
        if not isinstance(results, list):
            return results
        step_scores: list = [None] * len(texts)
        for members, result in zip(groups.values(), results):
            for i, scores in zip(members, result.step_scores):
                step_scores[i] = scores
        tokens = sum(text.tokens for text in texts)
        return {
            "id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model_name,
            "data": [{"index": i, "object": "pooling", "data": [[1.0 - p, p] for p in scores]}
                     for i, scores in enumerate(step_scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
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
            return bad_request(exc)
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
            return bad_request(exc)
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
