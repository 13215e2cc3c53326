"""`ttsearch serve` on loopback, talked to with the official openai client: searches (the server
searches every chat request here, ``search_by_default``) plain, with settings and streamed,
32 concurrent requests from 8 threads, bad requests of every kind, and clients that go away
mid-search. SmolLM2 in float32 with the arithmetic checker. Plain generation, step scoring
and its_hub are in test_serve_generation.py."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from test_search import ScriptedPolicy, ScriptedVerifier  # tests/ is on sys.path under pytest
from ttsearch import Searcher
from ttsearch.eval.datasets import Problem
from ttsearch.search.config import SearchConfig
from ttsearch.search.scheduler import Job, Scheduler
from ttsearch.search.strategies import SEARCHES
from ttsearch.serve import SearchService, create_app, decided_nodes

MODEL = "smollm2-135m"
DEFAULTS = dict(strategy="beam_search", n=2, beam_width=2, max_iterations=2, max_step_tokens=12, max_tokens=24)
QUESTION = [{"role": "user", "content": "What is 12 * 7 + 5?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server for ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(smollm2_engine_fp32):
    service = SearchService(Searcher(policy=smollm2_engine_fp32, verifier="arithmetic", **DEFAULTS)).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def base_url(service):
    with Server(create_app(service, MODEL, search_by_default=True)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def wait_idle(service, engine, timeout=60.0):
    deadline = time.time() + timeout
    while any(service.load().values()):
        assert time.time() < deadline, f"the service is still busy: {service.load()}"
        time.sleep(0.05)
    time.sleep(0.1)  # let the engine thread finish its last step
    return engine.stats()


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_a_plain_request_gets_the_chosen_path(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)
    extra = reply.model_extra["ttsearch"]
    assert reply.choices[0].message.content == next(c["text"] for c in extra["completions"]
                                                     if c["text"] == reply.choices[0].message.content)
    assert extra["strategy"] == "beam_search" and extra["n"] == 2
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_search_settings_come_in_the_body(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, seed=3,
                                           extra_body={"search": {"strategy": "best_of_n", "n": 3}})
    extra = reply.model_extra["ttsearch"]
    assert extra["strategy"] == "best_of_n" and extra["n"] == 3 and len(extra["completions"]) <= 3


def test_a_streamed_reply_sends_the_chosen_path_step_by_step(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True,
                                                 extra_body={"search": {"n": 4, "max_iterations": 3}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    chosen = next(c for c in final.model_extra["ttsearch"]["completions"] if c["text"] == text)
    # one chunk per step of the chosen path (an empty step sends no content)
    assert 1 <= sum(1 for c in chunks if c.choices[0].delta.content) <= len(chosen["step_scores"])
    assert chunks[0].choices[0].delta.role == "assistant"


def test_a_step_is_decided_once_every_open_path_and_answer_goes_through_it():
    # n = 4, M = 4: one beam survives each iteration and refills four
    policy, verifier = ScriptedPolicy(eos={"2/1"}), ScriptedVerifier({"2": 0.9, "2/3": 0.8})
    search = SEARCHES["beam_search"](policy, verifier, SearchConfig(n=4, beam_width=4, max_iterations=4), [1] * 5, "q")
    scheduler = Scheduler(policy, verifier)
    scheduler.add(Job(Problem(id="p", question="q", answer=None), search, SimpleNamespace(temperature=0.8)))
    decided = []
    while scheduler.jobs:
        scheduler.step()
        decided.append([search.nodes[i]["text"] for i in decided_nodes(search)])
    assert decided[0] == ["<2> "]  # after the first iteration every beam descends from root 2
    # 2/1 finished in the second iteration and 2/3 survived: only "<2> " is common to both
    assert decided[1] == ["<2> "] and search.completions[0].text == "<2> <2/1> "
    assert not policy.live


def test_32_concurrent_requests_from_8_threads_share_the_batch(client, service, smollm2_engine_fp32):
    questions = [f"What is {a} + {a * 3}?" for a in range(32)]

    def ask(question):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}])
        return question, reply.id, reply.model_extra["ttsearch"]["n"]

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, questions))
    assert sorted(q for q, _, _ in replies) == sorted(questions) and len({i for _, i, _ in replies}) == 32
    stats = wait_idle(service, smollm2_engine_fp32)
    assert stats["sequences"] == 0 and stats["blocks_used"] == 0


@pytest.mark.parametrize("search, message", [
    ({"strategy": "nope"}, "strategy='nope': expected one of"),
    ({"n": 3}, "n=3 is not a multiple of beam_width=2"),
    ({"temperature": -1}, "temperature=-1"),
    ({"bogus": 1}, "unknown setting(s) bogus"),
    ({"n": 100000}, "cannot fit in the policy's KV pool even alone"),
])
def test_bad_search_settings_get_400_and_the_server_goes_on(client, search, message):
    with pytest.raises(openai.BadRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"search": search})
    assert client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content is not None


def test_malformed_requests_get_openai_style_errors(client, base_url):
    with pytest.raises(openai.BadRequestError, match="over the context length|no room left for a step"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "seven " * 10000}])
    # a budget past the context used to be accepted, and searched for minutes
    with pytest.raises(openai.BadRequestError, match=r"max_tokens=1000000000000: past the context length 8192"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**12)
    with pytest.raises(openai.BadRequestError, match=r"n=3: applies to generation requests, not to a search"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=3)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    for body, where in [({"model": MODEL}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                          "messages.0.role"),
                        ({"messages": QUESTION, "search": [1]}, "search")]:
        reply = httpx.post(f"{base_url}/v1/chat/completions", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == where, reply.text
    reply = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()
    assert client.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content is not None


def test_api_key_and_a_full_queue(smollm2_engine_fp32):
    busy = SearchService(Searcher(policy=smollm2_engine_fp32, verifier="arithmetic", **DEFAULTS), max_waiting=0)
    with Server(create_app(busy, MODEL, api_key="secret")) as url:
        anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            anonymous.chat.completions.create(model=MODEL, messages=QUESTION)
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="retry later") as caught:
            keyed.chat.completions.create(model=MODEL, messages=QUESTION)
        assert caught.value.status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200  # no key needed to ask if it is up


def test_a_client_that_goes_away_has_its_beams_freed(base_url, service, smollm2_engine_fp32):
    long = {"search": {"n": 8, "beam_width": 2, "max_iterations": 40, "max_step_tokens": 64, "max_tokens": 512}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json={"messages": QUESTION, **long}, timeout=1.5)
    stats = wait_idle(service, smollm2_engine_fp32, timeout=30)
    assert stats["sequences"] == 0 and stats["blocks_used"] == 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={"messages": QUESTION, "stream": True, **long},
                      timeout=60) as reply:
        next(reply.iter_lines())  # the first chunk: the search is under way; then hang up
    stats = wait_idle(service, smollm2_engine_fp32, timeout=30)
    assert stats["sequences"] == 0 and stats["blocks_used"] == 0
