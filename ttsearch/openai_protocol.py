"""vLLM's OpenAI-compatible request and reply shapes for plain generation (``ttsearch serve``).

Requests are read as vLLM reads them: ``/v1/chat/completions`` renders the messages with the
model's chat template (``add_generation_prompt``, ``continue_final_message``), ``/v1/completions``
takes text or token ids (``echo``); both take ``n``, ``stop`` (a string or a list),
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
``logprobs``, ``include_stop_str_in_output`` and ``stream``. Fields sent under a literal
``"extra_body"`` object (as clients that post JSON themselves do) count as top-level ones.
A field this server does not know is ignored, as vLLM ignores it (and named in the log); one
that would change the result away from its default (penalties, logit bias, tools, structured
output, ...) is refused with a 400 naming it. ``PoolingRequest`` is vLLM's reward-model
``/pooling`` request, read into the verifier's questions and steps by ``pooling_texts``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from ttsearch.engine.sampler import SamplingParams, TokenLogprobs
from ttsearch.errors import TTSearchError
from ttsearch.search.generation import GenerationParams, Output
from ttsearch.verifiers.tagged_text import TaggedText, read_solution, read_text, step_tag

log = logging.getLogger("ttsearch.serve")

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs


class RequestError(TTSearchError, ValueError):
    """A request that can never be served as asked (HTTP 400); ``param``: the field at fault,
    where the reply names it apart."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


#: vLLM's sampling fields that this server does not implement: the values that leave the result as it is
UNSUPPORTED = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "logit_bias": (None, {}),
    "stop_token_ids": (None, []),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "skip_special_tokens": (None, True),
    "prompt_logprobs": (None,),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "suffix": (None, ""),
    "echo": (None, False),  # chat's echo; completions' own is a field
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """The fields chat and completion requests share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    best_of: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data):
        # A client that posts JSON itself sends vLLM's extra fields under "extra_body" (the
        # openai client merges them into the top level): both count, the top level first.
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            data = {**data["extra_body"], **{k: v for k, v in data.items() if k != "extra_body"}}
        return data

    def check_fields(self) -> None:
        """Refuse a field set to a value that would change the result; log the ignored ones."""
        extra = dict(self.model_extra or {})
        for name, off in UNSUPPORTED.items():
            value = extra.pop(name, None)
            if value not in off:
                raise RequestError(f"{name}={value!r}: not supported by this server; leave it unset")
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(f"best_of={self.best_of}: not supported (it must equal n={self.n}); leave it unset")
        ignored = sorted(set(extra) - {"extra_body", "user", "tool_choice", "parallel_tool_calls", "stream_options"})
        if ignored:
            log.warning("request fields ignored: %s", ", ".join(ignored))

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise RequestError("stop: a stop string must not be empty")
        return tuple(stops)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. "name": ignored

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)  # as vLLM joins text parts
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    search: dict | None = None

    def plain_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None


class ScoreStepsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    question: str
    paths: list[list[str]]


class PoolingRequest(BaseModel):
    """vLLM's ``POST /pooling`` for a process reward model: the completion form (``input``, a
    text or a list of texts, each in the PRM's format with a tag ending every step) or the chat
    form (``messages``: the last user turn is the question, the final assistant message holds
    the steps). vLLM's other fields (``priority``, ``request_id``, ``task``, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[Message] | None = None
    encoding_format: str = "float"
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None  # vLLM's default: true for input, false for messages
    user: str | None = None
    dimensions: int | None = None
    use_activation: bool | None = None


# ----------------------------------------------------------------------------- requests -> work


def pooling_texts(verifier, request: PoolingRequest) -> list[TaggedText]:
    """Each input of a /pooling request as the question and steps the verifier scores, in
    order; a RequestError naming the field for anything it cannot score."""
    if request.encoding_format != "float":
        raise RequestError(f"encoding_format={request.encoding_format!r}: only 'float' is served", "encoding_format")
    if request.dimensions is not None:
        raise RequestError(f"dimensions={request.dimensions}: applies to embeddings, not to a reward model's steps",
                           "dimensions")
    if request.use_activation is False:
        raise RequestError("use_activation=false: the verifier returns probabilities only; leave it unset",
                           "use_activation")
    truncate = request.truncate_prompt_tokens
    if truncate is not None and truncate < -1:
        raise RequestError(f"truncate_prompt_tokens={truncate}: must be -1 or at least 0", "truncate_prompt_tokens")
    if (request.input is None) == (request.messages is None):
        raise RequestError("input: send the texts in the PRM's format (input) or a chat (messages)"
                           + (", not both" if request.input is not None else ""), "input")
    try:
        step_tag(verifier)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    if request.messages is not None:
        texts = [_pooling_chat(verifier, request.messages)]
        names = ["messages"]
    else:
        inputs = request.input
        if isinstance(inputs, list) and inputs and not all(isinstance(x, str) for x in inputs):
            raise RequestError("input: token ids are not served; send the text (the verifier writes its own tokens)",
                               "input")
        if isinstance(inputs, list) and not inputs:
            raise RequestError("input: expected a text or a non-empty list of texts", "input")
        names = ["input"] if isinstance(inputs, str) else [f"input[{i}]" for i in range(len(inputs))]
        special = request.add_special_tokens is not False
        texts = []
        for name, text in zip(names, [inputs] if isinstance(inputs, str) else inputs):
            if not text.strip():
                raise RequestError(f"{name}: the text is empty", name)
            try:
                texts.append(read_text(verifier, text, special))
            except ValueError as exc:
                raise RequestError(f"{name}: {exc}", name) from exc
    if truncate is not None and truncate != -1:
        for name, text in zip(names, texts):
            if text.tokens > truncate:
                raise RequestError(f"truncate_prompt_tokens={truncate}: {name} holds {text.tokens} tokens to its last "
                                   "tag, and a cut text would lose its question; the verifier scores whole texts",
                                   "truncate_prompt_tokens")
    return texts


def _pooling_chat(verifier, messages: list[Message]) -> TaggedText:
    if not messages:
        raise RequestError("messages: expected the question (a user message) and the steps (the assistant's)",
                           "messages")
    last = len(messages) - 1
    if messages[last].role != "assistant":
        raise RequestError(f"messages[{last}].role={messages[last].role!r}: the last message must be the assistant's "
                           "steps, each ending with the verifier's step tag", f"messages[{last}].role")
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users:
        raise RequestError("messages: no user message to take the question from", "messages")
    question, solution = messages[users[-1]].text(), messages[last].text()
    if not question.strip():
        raise RequestError(f"messages[{users[-1]}].content: the question is empty", f"messages[{users[-1]}].content")
    try:
        return read_solution(verifier, question, solution)
    except ValueError as exc:
        raise RequestError(f"messages[{last}].content: {exc}", f"messages[{last}].content") from exc


def chat_prompt(tokenizer, request: ChatRequest) -> list[int]:
    """The conversation rendered by the model's chat template, as token ids."""
    if request.continue_final_message and request.add_generation_prompt:
        raise RequestError("continue_final_message and add_generation_prompt cannot both be true: "
                           "send add_generation_prompt=false to continue the final message")
    if not request.messages:
        raise RequestError("messages: expected at least one message")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("the model has no chat template: send the text to /v1/completions")
    try:
        text = tokenizer.apply_chat_template(request.plain_messages(), tokenize=False,
                                             add_generation_prompt=request.add_generation_prompt,
                                             continue_final_message=request.continue_final_message)
    except ValueError as exc:  # e.g. a final message the template does not render as written
        raise RequestError(f"messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompts(tokenizer, vocab_size: int, request: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and text (vLLM encodes text with the tokenizer's special tokens)."""
    prompt = request.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt: expected a string, a list of strings, or token ids")
    out = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            ids, text = tokenizer.encode(item), item
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
            ids, text = list(item), tokenizer.decode(item)
        if not ids:
            raise RequestError(f"prompt[{i}]: the prompt is empty")
        out.append((ids, text))
    return out


def generation_params(request: _Request, prompt_tokens: int, max_model_len: int, max_tokens: int | None,
                      logprobs: int | None, seed: int) -> GenerationParams:
    """A request's sampling parameters, checked against the model's context like vLLM's:
    ``max_tokens`` defaults to the room the prompt leaves."""
    request.check_fields()
    if prompt_tokens >= max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
                           f"{prompt_tokens}: no room is left to generate. Please reduce the length of the prompt.")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens
    if max_tokens < 1:
        raise RequestError(f"max_tokens={max_tokens}: must be at least 1")
    if prompt_tokens + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion, "
            f"max_tokens={max_tokens}). Please reduce the length of the prompt or max_tokens.")
    if request.n < 1:
        raise RequestError(f"n={request.n}: must be at least 1")
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    top_k = request.top_k if request.top_k not in (None, -1) else 0  # vLLM's -1: off
    if problem := SamplingParams.out_of_range(temperature, top_p, top_k):
        field, rule = problem
        value = {"temperature": temperature, "top_p": top_p, "top_k": request.top_k}[field]
        raise RequestError(f"{field}={value}: {rule}")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs={logprobs}: must be between 0 and {MAX_LOGPROBS}")
    return GenerationParams(n=request.n, max_tokens=max_tokens, stop=request.stops(),
                            include_stop_str_in_output=request.include_stop_str_in_output, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed, logprobs=logprobs, ignore_eos=request.ignore_eos)


def chat_logprobs_count(request: ChatRequest) -> int | None:
    if request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs: logprobs must be true to ask for top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def completion_logprobs_count(request: CompletionRequest) -> int | None:
    if request.logprobs is not None and request.echo:
        raise RequestError("echo with logprobs asks for the prompt's log-probabilities, which this server does "
                           "not compute; leave one of them unset")
    return request.logprobs


# ----------------------------------------------------------------------------- replies


@dataclass
class Delta:
    """A streamed piece of one choice: new text, its tokens' log-probabilities, and the end."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    stop_reason: str | None = None


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(tokenizer, logprobs: list[TokenLogprobs], token_ids: list[int]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(token_ids, logprobs)]}


def completion_logprobs(tokenizer, logprobs: list[TokenLogprobs], token_ids: list[int], offset: int = 0) -> dict:
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token_text(tokenizer, i): v for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def chat_choice(tokenizer, index: int, output: Output) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": output.text},
            "logprobs": chat_logprobs(tokenizer, output.logprobs, output.token_ids) if output.logprobs is not None
            else None,
            "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}


def completion_choice(tokenizer, index: int, output: Output, echo: str | None = None) -> dict:
    prefix = echo or ""
    return {"index": index, "text": prefix + output.text,
            "logprobs": completion_logprobs(tokenizer, output.logprobs, output.token_ids, len(prefix))
            if output.logprobs is not None else None,
            "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}


def chat_chunk_choice(tokenizer, delta: Delta) -> dict:
    return {"index": delta.index, "delta": {"content": delta.text},
            "logprobs": chat_logprobs(tokenizer, delta.logprobs, delta.token_ids) if delta.logprobs is not None
            else None,
            "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}


def completion_chunk_choice(tokenizer, delta: Delta) -> dict:
    return {"index": delta.index, "text": delta.text,
            "logprobs": completion_logprobs(tokenizer, delta.logprobs, delta.token_ids)
            if delta.logprobs is not None else None,
            "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
