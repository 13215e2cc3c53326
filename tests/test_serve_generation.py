"""`ttsearch serve` as the backend of step-wise clients, on loopback: plain generation with vLLM's
semantics through the official openai client, prefix reuse across requests, step scoring
(``/v1/score_steps``, and vLLM's ``/pooling`` shape for it), bad input, and its_hub itself
(self-consistency, best-of-N with an LLM judge on the same server, particle filtering and beam
search with our step scorer).

The model's quality does not matter here: a tiny random Llama (tests/conftest.py) is the
policy, and, on the same engine, a Math-Shepherd-format PRM (its scores are random too, but
computed on the verifier's KV tree like any PRM's)."""

from __future__ import annotations

import math
import re

import httpx
import openai
import pytest
import torch

from test_serve import Server, wait_idle  # tests/ is on sys.path under pytest
from ttsearch import Engine, Searcher
from ttsearch.eval.arithmetic import bundled_arithmetic_path
from ttsearch.eval.datasets import load_jsonl
from ttsearch.serve import SearchService, create_app
from ttsearch.verifiers import SelfVerifier, load_verifier
from ttsearch.verifiers.path_scorer import PathScorer

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "What is 12 * 7 + 5?"}]
SEARCH = dict(strategy="beam_search", n=2, beam_width=2, max_iterations=2, max_step_tokens=8, max_tokens=16)
PRM = dict(family="math-shepherd", tag="<|endoftext|>", good="=", bad="8")  # one token each in the tiny vocabulary


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=4 << 20, progress=False)


@pytest.fixture(scope="module")
def service(engine, tiny_checkpoints):
    verifier = load_verifier(str(tiny_checkpoints["llama3"]), policy_engine=engine, **PRM)
    service = SearchService(Searcher(policy=engine, verifier=verifier, **SEARCH)).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def base_url(service):
    with Server(create_app(service, MODEL)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def no_leak(service, engine):
    stats = wait_idle(service, engine)
    assert stats["sequences"] == 0 and stats["blocks_used"] == 0, stats


# ----------------------------------------------------------------------------- generation


def test_the_engine_reports_reuse_and_log_probabilities(tiny_checkpoints):
    from ttsearch import SamplingParams

    for caching in (True, False):
        engine = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False,
                        prefix_caching=caching)
        prompt = list(range(5, 45))
        first = engine.add(prompt)
        expected = torch.log_softmax(engine.logits(first), -1)
        engine.free(first)
        again, other = engine.add_batch([prompt, prompt[:20] + [7] * 9])
        assert (again.cached_tokens, other.cached_tokens) == ((32, 16) if caching else (0, 0))
        (token, logprobs), _ = engine.sample_step([again, other], [SamplingParams(temperature=1.0, logprobs=3),
                                                                     SamplingParams(temperature=1.0)])
        assert logprobs.logprob == pytest.approx(expected[token].item(), abs=1e-5)
        assert [i for i, _ in logprobs.top] == torch.topk(expected, 3).indices.tolist()
        engine.free(again), engine.free(other)
        assert engine.stats()["blocks_used"] == 0


def test_n_choices_stop_at_a_stop_string(client, service, engine):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, n=4, stop=["e", "zz"], max_tokens=24,
                                           temperature=1.0, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all("e" not in c.message.content for c in reply.choices)
    stopped = [c for c in reply.choices if c.finish_reason == "stop" and c.model_extra["stop_reason"] == "e"]
    assert stopped, [c.message.content for c in reply.choices]  # "e" is common enough to end some choice
    assert len({c.message.content for c in reply.choices}) > 1  # the choices sample apart
    assert reply.usage.completion_tokens <= 4 * 24 and reply.usage.prompt_tokens > 0
    kept = client.chat.completions.create(model=MODEL, messages=QUESTION, n=4, stop="e", max_tokens=24,
                                          temperature=1.0, seed=2, extra_body={"include_stop_str_in_output": True})
    for choice in kept.choices:
        if choice.model_extra["stop_reason"] == "e":
            assert choice.message.content.endswith("e") and "e" not in choice.message.content[:-1]
    no_leak(service, engine)


def test_max_completion_tokens_cuts_with_length(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    reply = client.completions.create(model=MODEL, prompt="12 * 7 = 84", max_tokens=3, temperature=0.5, seed=4)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_ignore_eos_writes_on_to_max_tokens(client, engine, monkeypatch):
    monkeypatch.setattr(engine, "eos_token_ids", frozenset(range(engine.config.vocab_size)))  # any token ends it
    reply = client.completions.create(model=MODEL, prompt="12 * 7 = 84", max_tokens=6, temperature=0)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1
    for body in ({"ignore_eos": True}, {"extra_body": {"ignore_eos": True}}):  # top level, or as a client posts it
        reply = client.completions.create(model=MODEL, prompt="12 * 7 = 84", max_tokens=6, temperature=0,
                                          extra_body=body)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6


def test_continue_final_message_equals_completing_the_rendered_text(client, engine):
    messages = QUESTION + [{"role": "assistant", "content": "Step 1: 12 * 7 = 84.\n\n"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False})
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nStep 1: 12 * 7 = 84.\n\n")  # the assistant's turn left open
    completion = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=12)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens == len(engine.tokenizer.encode(text))
    echoed = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=12, echo=True)
    assert echoed.choices[0].text == text + completion.choices[0].text


def test_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and sum(math.exp(t) for t in top) <= 1 + 1e-5
        # greedy: the token written is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(top[0], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    sampled = client.completions.create(model=MODEL, prompt="12 * 7 = 84", max_tokens=5, temperature=1.0, seed=3,
                                        logprobs=2)
    logprobs = sampled.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= max(top.values()) + 1e-5 and 1 <= len(top) <= 2


def test_a_prompt_sent_again_is_reused_from_the_prefix_cache(client, engine):
    long = [{"role": "user", "content": "Step 1: 12 * 7 = 84. Step 2: 84 + 5 = 89. " * 12 + "What now?"}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=4, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=long, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens > 200
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens / 2
    # a path that only grew: everything up to the last full block of the earlier request is reused
    grown = long + [{"role": "assistant", "content": first.choices[0].message.content + " more"}]
    step = client.chat.completions.create(model=MODEL, messages=grown, max_tokens=4, temperature=0,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False})
    cached = step.usage.prompt_tokens_details.cached_tokens
    assert cached >= (first.usage.prompt_tokens // engine.block_size) * engine.block_size
    assert step.usage.prompt_tokens - cached < 2 * engine.block_size + 8


def test_streaming_sends_what_a_reply_holds(client, service, engine):
    kwargs = dict(model=MODEL, messages=QUESTION, n=2, temperature=0, max_tokens=16, stop=["e"], logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, finishes, tokens = ["", ""], [None, None], [0, 0]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = finishes[choice.index] or choice.finish_reason
        tokens[choice.index] += len(choice.logprobs.content) if choice.logprobs else 0
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert tokens == [len(c.logprobs.content) for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt="12 * 7 =", max_tokens=8, temperature=0, echo=True,
                                         stream=True)
    plain = client.completions.create(model=MODEL, prompt="12 * 7 =", max_tokens=8, temperature=0, echo=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    # a client that hangs up mid-stream has its choices freed
    body = {"model": MODEL, "messages": QUESTION, "n": 3, "max_tokens": 400, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", f"{client.base_url}chat/completions", json=body, timeout=60) as reply:
        next(reply.iter_lines())
    no_leak(service, engine)


def test_bad_requests_get_400_naming_the_field_and_nothing_leaks(client, base_url, service, engine):
    cases = [
        (dict(messages=[{"role": "user", "content": "seven " * 600}]), "maximum context length is 512"),
        (dict(messages=QUESTION, max_tokens=10**12), r"maximum context length is 512 tokens\. However, you requested"),
        (dict(messages=QUESTION, n=0), "n=0: must be at least 1"),
        (dict(messages=QUESTION, n=100000), "n=100000: 100000 choices"),
        (dict(messages=QUESTION, temperature=-1), "temperature=-1.0: must be >= 0"),
        (dict(messages=QUESTION, logprobs=True, top_logprobs=50), "logprobs=50: must be between 0 and 20"),
        (dict(messages=QUESTION, presence_penalty=0.5), "presence_penalty=0.5: not supported"),
        (dict(messages=QUESTION, response_format={"type": "json_object"}), "response_format=.*not supported"),
        (dict(messages=QUESTION, extra_body={"continue_final_message": True}), "cannot both be true"),
        (dict(messages=QUESTION, stop=[""]), "stop: a stop string must not be empty"),
        (dict(messages=QUESTION, max_tokens=10**12, extra_body={"search": {}}), "max_tokens=1000000000000: past"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=MODEL, **kwargs)
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model=MODEL, prompt="12", echo=True, logprobs=1, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[0\]: token id 99999 is outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 99999], max_tokens=2)
    for body, where in [({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
                        ({"messages": QUESTION, "n": "many"}, "n")]:
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"].startswith(where), reply.text
    # a field this server does not know is ignored, as vLLM ignores it
    fine = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, presence_penalty=0,
                                          extra_body={"bogus_field": 1, "guided_json": None})
    assert fine.choices[0].finish_reason in ("length", "stop")
    no_leak(service, engine)


def test_generations_that_outgrow_the_pool_are_preempted_and_still_finish(tiny_checkpoints):
    from ttsearch.search.generation import GenerationParams

    small = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=48 * 16 * 512, progress=False)
    service = SearchService(Searcher(policy=small, verifier="arithmetic", **SEARCH)).start()
    try:
        params = GenerationParams(n=4, max_tokens=150, temperature=1.0, seed=5)
        prompts = [small.tokenizer.encode(f"{a} + {a} = {2 * a}. ") for a in (3, 4)]
        tickets = [service.submit_generation(ids, params) for ids in prompts]  # 8 choices of 150: over 48 blocks
        for ticket in tickets:
            generation = ticket.future.result(timeout=120)
            assert all(c.result is not None for c in generation.choices) and len(generation.choices) == 4
        assert service.scheduler.stats.preemptions >= 1 and service.scheduler.stats.restores >= 1
        no_leak(service, small)
    finally:
        service.stop()


# ----------------------------------------------------------------------------- step scoring


def test_score_steps_scores_incrementally_as_scoring_from_scratch(base_url, service, engine, tiny_checkpoints):
    question = "What is 12 * 7 + 5?"
    paths = [["12 * 7 = 84\n\n", "84 + 5 = 89\n\n"], ["12 * 7 = 84\n\n", "84 + 5 = 90\n\n"], ["12 * 7 = 84\n\n"]]
    first = httpx.post(f"{base_url}/v1/score_steps", json={"question": question, "paths": paths}).json()
    assert first["usage"]["steps"] == 3 and first["usage"]["steps_scored"] == 3  # the shared first step once
    grown = [p + ["The answer is 89.\n\n"] for p in paths[:2]]
    second = httpx.post(f"{base_url}/v1/score_steps", json={"question": question, "paths": grown}).json()
    assert second["usage"]["steps_remembered"] == 3 and second["usage"]["steps_scored"] == 2
    assert second["usage"]["verifier_tokens"] < first["usage"]["verifier_tokens"] + 40
    for before, after in zip(first["data"], second["data"]):
        assert after["step_scores"][:2] == before["step_scores"]
    # the same scores as a PRM of its own scoring each path step by step from nothing
    prm = load_verifier(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False,
                        aggregation="last", **PRM)
    for path, got in zip(grown, second["data"]):
        state = prm.new(question)
        expected = [prm.score([state], [step])[0] for step in path]
        assert got["step_scores"] == pytest.approx(expected, abs=1e-4) and got["aggregate"] == got["step_scores"][-1]
    bad = httpx.post(f"{base_url}/v1/score_steps", json={"question": question, "paths": [[1]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("paths")
    with pytest.raises(ValueError, match="judges the policy's own beams"):
        PathScorer(SelfVerifier(engine, candidates=("=", "8"))).check(question, paths)
    no_leak(service, engine)


# ----------------------------------------------------------------------------- vLLM's /pooling


def tagged(steps: list[str]) -> str:
    """Steps as a Math-Shepherd-format PRM reads them: each followed by its tag, before its own
    trailing whitespace."""
    return "".join(f"{s.rstrip()} {PRM['tag']}{s[len(s.rstrip()):]}" for s in steps)


def test_pooling_gives_the_score_steps_scores_of_the_steps_it_finds(base_url, service, engine):
    question = "What is 3 * 4 + 2?"  # scored by no other test: nothing is remembered for it yet
    paths = [["3 * 4 = 12\n\n", "12 + 2 = 14\n\n"], ["3 * 4 = 12\n\n", "12 + 2 = 15\n\n", "So 15.\n\n"]]
    # the chat form names the question: the question and steps that /v1/score_steps takes
    chat = httpx.post(f"{base_url}/pooling", json={"model": MODEL, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": tagged(paths[0])}]}).json()
    assert chat["object"] == "list" and chat["id"].startswith("pool-") and chat["model"] == MODEL
    (entry,) = chat["data"]
    assert entry["index"] == 0 and entry["object"] == "pooling" and len(entry["data"]) == 2
    score = httpx.post(f"{base_url}/v1/score_steps", json={"question": question, "paths": paths}).json()
    # the same service path: the steps the chat form scored are remembered, with their very scores
    assert score["usage"]["steps_remembered"] == 2 and score["usage"]["steps_scored"] == 2
    assert [p_good for _, p_good in entry["data"]] == score["data"][0]["step_scores"]
    # the completion form: the question, a space, then the steps; a list gives an entry per text, in order
    texts = [f"{question} {tagged(path)}" for path in paths[::-1]]
    completion = httpx.post(f"{base_url}/v1/pooling", json={"model": MODEL, "input": texts}).json()
    assert [d["index"] for d in completion["data"]] == [0, 1]
    for got, expected in zip(completion["data"], score["data"][::-1]):
        assert [p_good for _, p_good in got["data"]] == pytest.approx(expected["step_scores"], abs=1e-6, rel=0)
        assert all(p_bad == 1.0 - p_good and p_bad + p_good == pytest.approx(1.0, abs=1e-15)
                   for p_bad, p_good in got["data"])
    flat = [p for pair in completion["data"][1]["data"] for p in pair]
    assert flat == pytest.approx([p for pair in chat["data"][0]["data"] for p in pair], abs=1e-6, rel=0)
    to_last_tag = [t[: t.rindex(PRM["tag"]) + len(PRM["tag"])] for t in texts]
    tokens = sum(len(engine.tokenizer.encode(t)) for t in to_last_tag)
    assert completion["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    no_leak(service, engine)


def test_pooling_refuses_what_it_cannot_score_and_nothing_leaks(base_url, service, engine):
    from ttsearch.openai_protocol import PoolingRequest, RequestError, pooling_texts
    from ttsearch.verifiers import ArithmeticChecker

    tag, question = PRM["tag"], "What is 3 * 4 + 2?"
    good = f"{question} 3 * 4 = 12 {tag}\n\n"
    long = f"{question} " + "3 * 4 = 12 and 12 + 2 = 14, so 14. " * 40 + tag
    cases = [
        ({"input": ""}, "input", "input: the text is empty"),
        ({"input": []}, "input", "input: expected a text"),
        ({"input": [good, question]}, "input[1]", r"input\[1\]: no step tag '<\|endoftext\|>'"),
        ({"input": [1, 2, 3]}, "input", "token ids are not served"),
        ({"input": 7}, "input", "input"),
        ({"input": f"{question} 3 * 4 = 12{tag}"}, "input", "step 1 .* is not written as the verifier writes it"),
        ({"input": f"{question} 3 * 4 = 12 {tag}12 + 2 = 14 {tag}"}, "input", "step 2 .* is not written"),
        ({"input": long}, "input", "over the verifier's context length 512"),
        ({"input": good, "encoding_format": "base64"}, "encoding_format", "encoding_format='base64': only 'float'"),
        ({"input": good, "truncate_prompt_tokens": 4}, "truncate_prompt_tokens", "truncate_prompt_tokens=4"),
        ({"input": good, "messages": [{"role": "user", "content": question}]}, "input", "not both"),
        ({"messages": [{"role": "user", "content": question}]}, "messages[0].role", "must be the assistant's steps"),
        ({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "3 * 4 = 12"}]},
         "messages[1].content", r"messages\[1\].content: no step tag"),
        ({"messages": [{"role": "assistant", "content": f"3 * 4 = 12 {tag}"}]}, "messages", "no user message"),
    ]
    for body, param, message in cases:
        reply = httpx.post(f"{base_url}/pooling", json={"model": MODEL, **body})
        assert reply.status_code == 400 and reply.json()["error"]["param"].startswith(param), reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert re.search(message, reply.json()["error"]["message"]), reply.text
    # more than the verifier's KV pool holds (512 blocks of 16): 24 paths of one question, each ~440 tokens
    many = [f"{question} {i} {tag}\n" + "3 * 4 = 12 and 12 + 2 = 14, so 14. " * 19 + tag for i in range(24)]
    reply = httpx.post(f"{base_url}/pooling", json={"model": MODEL, "input": many})
    assert reply.status_code == 400 and "do not fit in the verifier's KV pool" in reply.text, reply.text
    assert httpx.post(f"{base_url}/pooling", json={"model": "other", "input": good}).status_code == 404
    # the server still answers, vLLM's fields it does not use are ignored, and no block is left behind
    fine = httpx.post(f"{base_url}/pooling", json={"model": MODEL, "input": good, "add_special_tokens": True,
                                                   "truncate_prompt_tokens": -1, "user": "u", "priority": 0})
    assert fine.status_code == 200 and len(fine.json()["data"][0]["data"]) == 1
    no_leak(service, engine)
    with pytest.raises(RequestError, match="marks no step with a tag"):  # a verifier that writes no text
        pooling_texts(ArithmeticChecker(), PoolingRequest(input=good))


# ----------------------------------------------------------------------------- its_hub


def its_hub_lm(base_url):
    from its_hub import OpenAICompatibleLanguageModel

    return OpenAICompatibleLanguageModel(endpoint=f"{base_url}/v1", api_key="unused", model_name=MODEL,
                                         max_completion_tokens=12, temperature=0.8)


def questions(count: int = 2) -> list[str]:
    return [p.question for p in load_jsonl(bundled_arithmetic_path(), limit=count)]


def test_its_hub_self_consistency_and_best_of_n_with_an_llm_judge_on_the_same_server(base_url, service, engine):
    from its_hub import BestOfN, LLMJudge, SelfConsistency

    lm = its_hub_lm(base_url)
    for question in questions():
        result = SelfConsistency().infer(lm, question, budget=4, return_response_only=False)
        assert len(result.responses) == 4 and result.the_one in result.responses
    # structured output is not served here (a 400): the judge reads its score from plain text
    judge = LLMJudge(lm, response_format=None)
    before = service.totals["generation_requests"]
    result = BestOfN(judge).infer(lm, questions(1)[0], budget=3, return_response_only=False)
    assert len(result.scores) == 3 and result.the_one in result.responses
    assert service.totals["generation_requests"] - before >= 3 + 2  # the answers, then the judge's verdicts
    no_leak(service, engine)


def test_its_hub_particle_filtering_and_beam_search_with_our_step_scorer(base_url, service, engine):
    from its_hub import StepGeneration
    from its_hub.core.algorithms.beam_search import BeamSearch
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering

    from ttsearch.integrations.its_hub import ScoreStepsPRM

    lm, prm = its_hub_lm(base_url), ScoreStepsPRM(f"{base_url}/v1", model=MODEL)
    sg = StepGeneration(step_token="\n\n", max_steps=3, temperature=0.8)
    before = dict(service.totals)
    for question in questions():
        result = ParticleFiltering(sg, prm).infer(lm, question, budget=4, return_response_only=False)
        assert len(result.responses) == 4 and all(math.isfinite(w) for w in result.log_weights_lst)
        assert 1 <= max(result.steps_used_lst) <= sg.max_steps + 1  # its_hub stops once a path holds max_steps
    result = BeamSearch(sg, prm, beam_width=2).infer(lm, questions(1)[0], budget=4, return_response_only=False)
    assert result.responses and all(0 <= s <= 1 for s in result.scores)
    after = service.totals
    # each step request re-sent its grown path: the cache held its earlier part, and the scorer its earlier steps
    assert after["cached_tokens"] - before.get("cached_tokens", 0) > 0
    assert after["steps_remembered"] - before.get("steps_remembered", 0) > 0
    assert after["score_requests"] - before.get("score_requests", 0) >= 2 * 3
    no_leak(service, engine)


def test_the_adapter_splits_a_path_into_steps_as_they_were_written():
    from ttsearch.integrations.its_hub import ScoreStepsPRM

    prm = ScoreStepsPRM("http://127.0.0.1:1/v1")
    assert prm.steps("a = 1\n\nb = 2") == ["a = 1\n\n", "b = 2\n\n"]
    assert prm.steps("a = 1\n\n") == ["a = 1\n\n"]
    # a model that ends its first step at once wrote one empty step, which is scored like any
    # other (its_hub needs a score for every path)
    assert prm.steps("") == ["\n\n"] and prm.steps("\n\n") == ["\n\n"]
