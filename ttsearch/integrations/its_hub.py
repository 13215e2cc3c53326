"""its_hub's process reward model over ``ttsearch serve``'s ``POST /v1/score_steps``.

its_hub (``pip install 'ttsearch[its-hub]'``) drives a search from outside: its language model
is an OpenAI-compatible endpoint (point ``OpenAICompatibleLanguageModel`` at the server's
``/v1``), and its beam search and particle filtering score every live path after each step
with an ``AbstractProcessRewardModel``. ``ScoreStepsPRM`` is that model, served by the same
server: the server's verifier scores each path's steps on its own KV tree, remembering what
earlier requests scored, so each call costs about the new steps only.

    from its_hub import OpenAICompatibleLanguageModel, StepGeneration
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
    from ttsearch.integrations.its_hub import ScoreStepsPRM

    lm = OpenAICompatibleLanguageModel(endpoint="http://127.0.0.1:8000/v1", api_key="-", model_name="smollm2-135m",
                                       max_completion_tokens=64)
    sg = StepGeneration(step_token="\\n\\n", max_steps=8, stop_token=r"\\boxed")
    pf = ParticleFiltering(sg, ScoreStepsPRM("http://127.0.0.1:8000/v1"))
    pf.infer(lm, "What is 12 * 7 + 5?", budget=8)

its_hub hands the PRM each path as one text (its steps joined by the step token); the
adapter splits it back into steps at ``step_token``, each step keeping its delimiter, as a
step written by ttsearch's own searches does, and returns each path's aggregate score (the
server's ``--aggregation``): a probability, which particle filtering turns into a log-odds.
"""

from __future__ import annotations

import httpx
from its_hub.api import AbstractProcessRewardModel
from its_hub.api.types import ChatMessages


class ScoreStepsPRM(AbstractProcessRewardModel):
    """Scores paths with the verifier of the ttsearch server at ``base_url`` (its ``/v1``)."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 step_token: str = "\n\n", timeout: float = 600.0):
        if not step_token:
            raise ValueError("step_token: expected the delimiter that separates the steps")
        self.url = base_url.rstrip("/") + "/score_steps"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.step_token = step_token
        self.timeout = timeout

    def steps(self, response: str) -> list[str]:
        """A path's text as its steps, each ending with the step token (as a written step does).
        Every path has a step: an empty text is an empty step (a model may end a step at once),
        which the PRM scores like any other."""
        pieces = response.split(self.step_token)
        if len(pieces) > 1 and not pieces[-1]:
            pieces.pop()  # the text ended with the delimiter
        return [piece + self.step_token for piece in pieces]

    def _body(self, prompt_or_messages, responses: list[str]) -> dict:
        body = {"question": _question(prompt_or_messages), "paths": [self.steps(r) for r in responses]}
        return {**body, "model": self.model} if self.model else body

    def _aggregates(self, reply: httpx.Response) -> list[float]:
        if reply.status_code != 200:
            raise RuntimeError(f"{self.url}: HTTP {reply.status_code}: {reply.text[:500]}")
        return [item["aggregate"] for item in reply.json()["data"]]

    def score(self, prompt_or_messages, steps: str | list[str]) -> float | list[float]:
        single = isinstance(steps, str)
        with httpx.Client(timeout=self.timeout) as client:
            reply = client.post(self.url, json=self._body(prompt_or_messages, [steps] if single else steps),
                                headers=self.headers)
        scores = self._aggregates(reply)
        return scores[0] if single else scores

    async def ascore(self, prompt_or_messages, steps: str | list[str]) -> float | list[float]:
        single = isinstance(steps, str)
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            reply = await client.post(self.url, json=self._body(prompt_or_messages, [steps] if single else steps),
                                      headers=self.headers)
        scores = self._aggregates(reply)
        return scores[0] if single else scores


def _question(prompt_or_messages) -> str:
    """The question a path answers: the prompt, or the last user turn of a conversation."""
    if isinstance(prompt_or_messages, str):
        return prompt_or_messages
    messages = ChatMessages.from_prompt_or_messages(prompt_or_messages).to_chat_messages()
    users = [m for m in messages if (m.role if hasattr(m, "role") else m["role"]) == "user"]
    if not users:
        raise ValueError("the conversation has no user turn to take the question from")
    last = users[-1]
    return last.extract_text_content() if hasattr(last, "extract_text_content") else last["content"]
