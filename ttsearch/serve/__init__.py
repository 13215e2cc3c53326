"""``ttsearch serve``: an OpenAI-compatible server on FastAPI + uvicorn, for whole searches, plain
generation and step scoring, all on one engine.

One engine thread (``SearchService``, ``service.py``) drives one scheduler for every request,
so everything shares one decode batch and one KV pool; ``app.py`` is the HTTP layer over it:

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
  steps, incrementally (``verifiers/path_scorer.py``);
- ``POST /pooling`` (also ``/v1/pooling``) is vLLM's reward-model request for the same
  scoring: texts in the PRM's format (``input``), or a chat whose last user message is the
  question and whose final assistant message holds the steps (``messages``), each step ending
  at the verifier's tag (Math-Shepherd's ``ки``, Qwen2.5-Math-PRM's ``<extra_0>``). The text
  is cut at the tags into the question and steps that /v1/score_steps takes, and scored by the
  same path (``verifiers/tagged_text.py``); each step gets ``[p_bad, p_good]``, in
  Qwen2.5-Math-PRM's order (index 1 = good), ``p_good`` being its /v1/score_steps score. In
  Math-Shepherd's text the question and the first step are joined by a space nothing marks: the
  first step is taken to be the last word before the first tag (no score depends on it); the
  chat form names the question.
"""

from ttsearch.serve.app import create_app, serve
from ttsearch.serve.service import Busy, GenerationStream, SearchService, Ticket, decided_nodes

__all__ = ["SearchService", "Ticket", "GenerationStream", "Busy", "decided_nodes", "create_app", "serve"]
