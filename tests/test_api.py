"""The embedding API on SmolLM2 in float32: solve and solve_batch against `ttsearch run`, chat
messages, step callbacks; and the public extension points, used from outside the package: a
strategy and a verifier of our own, registered and run through Searcher and the CLI."""

from __future__ import annotations

import pytest

from ttsearch import Searcher, Strategy, Verifier, register_strategy, register_verifier
from ttsearch.cli import main
from ttsearch.eval.arithmetic import bundled_arithmetic_path
from ttsearch.eval.datasets import load_jsonl
from ttsearch.eval.grading import extract_answer
from ttsearch.search import run
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.results import read_results
from ttsearch.search.strategies import Write

SETTINGS = dict(strategy="beam_search", n=4, beam_width=2, max_iterations=3, max_step_tokens=24, max_tokens=48)


@pytest.fixture(scope="module")
def searcher(smollm2_engine_fp32):
    return Searcher(policy=smollm2_engine_fp32, verifier="arithmetic", **SETTINGS)


def test_solve_returns_the_answer_its_path_and_the_tree(searcher, smollm2_engine_fp32):
    result = searcher.solve("What is 12 * 7 + 5?")
    assert result.completions and result.text == result.completions[result.chosen].text
    chosen = result.completions[result.chosen]
    assert "".join(chosen.steps) == chosen.text and len(chosen.steps) == len(chosen.step_scores)
    assert result.answer == extract_answer(result.text) or (result.answer is None and chosen.answer is None)
    ids = {node["id"] for node in result.nodes}
    assert all(node["parent"] is None or node["parent"] in ids for node in result.nodes)
    assert result.tokens_generated == sum(node["tokens"] for node in result.nodes) > 0
    assert result.prompt_tokens > 0 and result.tokens_verified == 0  # the checker forwards no tokens
    assert set(result.selections) == {"naive", "majority", "weighted"} and "correct" not in result.record
    assert smollm2_engine_fp32.stats()["sequences"] == 0


def test_solve_and_solve_batch_give_what_ttsearch_run_writes(searcher, tmp_path):
    problems = load_jsonl(bundled_arithmetic_path(), limit=3)
    out = tmp_path / "run.jsonl"
    run(SearchConfig(**SETTINGS), out, policy=searcher.policy, verifier=searcher.verifier, limit=3, progress=False)
    written = {r["id"]: r for r in read_results(out)}
    batch = searcher.solve_batch([p.question for p in problems], ids=[p.id for p in problems])
    alone = searcher.solve(problems[1].question, id=problems[1].id)
    for problem, result in zip(problems, batch):
        assert [c.text for c in result.completions] == [c["text"] for c in written[problem.id]["completions"]]
        assert result.answer == written[problem.id]["selections"]["naive"]["4"]["answer"]
    assert [c.text for c in alone.completions] == [c.text for c in batch[1].completions]


def test_chat_messages_and_per_call_settings(searcher):
    messages = [{"role": "system", "content": "Answer with one calculation per step."},
                {"role": "user", "content": "What is 3 + 4?"}]
    result = searcher.solve(messages, strategy="best_of_n", n=2, max_tokens=24)
    assert result.record["strategy"] == "best_of_n" and len(result.completions) <= 2
    assert searcher.config.strategy == "beam_search"  # the call's settings did not stick
    with pytest.raises(ValueError, match=r"messages\[1\]: the last message must be the user's question"):
        searcher.solve([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    with pytest.raises(ValueError, match=r"messages\[0\]: expected"):
        searcher.solve([{"role": "robot", "content": "hi"}])
    with pytest.raises(ConfigError, match="n=3 is not a multiple of beam_width=2"):
        searcher.solve("What is 3 + 4?", n=3)


def test_on_step_sees_every_scored_step_as_it_happens(searcher):
    events = []
    results = searcher.solve_batch(["What is 2 + 2?", "What is 5 * 6?"], on_step=events.append)
    for index, result in enumerate(results):
        mine = [e.node for e in events if e.index == index]
        assert mine == result.nodes and all(e.question == result.question for e in events if e.index == index)


# ----------------------------------------------------------------------------- extension points


class Halving(Strategy):
    """n paths; after every step the better half of the open ones goes on, until one is left,
    which writes to EOS."""

    def start(self, root=None):
        self.live = self.start_roots(self.config.n, root=root)

    def write_for(self, beam):
        if len(self.live) == 1:
            return Write(None, self.config.max_tokens)
        return super().write_for(beam)

    def advance(self, ended):
        self.iteration += 1
        finished, open_ = self.settle(self.live)
        if not open_ or self.iteration >= self.config.max_iterations:
            self.end(finished, open_)
            return
        ranked = self.rank(open_)
        keep = ranked[: max(1, len(ranked) // 2)]
        for beam in ranked[len(keep):]:
            self.release(beam)
        self.live = keep


class EquationsVerifier(Verifier):
    """Prefers short steps that hold an equation; remembers what it was asked."""

    def __init__(self, aggregation="last"):
        super().__init__(aggregation)
        self.calls = []

    def score_steps(self, questions, paths, steps):
        self.calls.append((questions, paths, steps))
        return [step_score(step) for step in steps]


def step_score(step: str) -> float:
    return (1.0 if "=" in step else 0.3) / (1 + len(step) / 200)


@pytest.fixture(scope="module")
def registered():
    verifiers = []

    def factory(policy_engine=None, aggregation="last"):
        verifiers.append(EquationsVerifier(aggregation))
        return verifiers[-1]

    register_strategy("halving", Halving)
    register_verifier("equations", factory)
    return verifiers


def test_a_strategy_and_a_verifier_of_our_own_run_through_searcher(registered, smollm2_engine_fp32):
    searcher = Searcher(policy=smollm2_engine_fp32, verifier="equations", strategy="halving", n=4,
                        max_iterations=4, max_step_tokens=16, max_tokens=32)
    result = searcher.solve("What is 12 * 7 + 5?")
    verifier = registered[-1]
    assert result.record["strategy"] == "halving" and result.record["rules"]["semantics"] == "custom"
    assert result.completions and result.iterations <= 4
    texts = {node["id"]: node for node in result.nodes}
    for node in result.nodes:
        assert node["score"] == pytest.approx(step_score(node["text"]))
    # the verifier saw each path's earlier steps: they are the tree's path to the node's parent
    seen = [(q, tuple(p), s) for qs, ps, ss in verifier.calls for q, p, s in zip(qs, ps, ss)]
    for node, (question, path, step) in zip(result.nodes, seen):
        above, parent = [], node["parent"]
        while parent is not None:
            above.append(texts[parent]["text"])
            parent = texts[parent]["parent"]
        assert (question, path, step) == ("What is 12 * 7 + 5?", tuple(above[::-1]), node["text"])
    assert smollm2_engine_fp32.stats()["sequences"] == 0


def test_the_cli_runs_a_registered_strategy_and_verifier(registered, tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "halving.jsonl"
    code = main(["run", "--model", str(tiny_checkpoints["llama3"]), "--strategy", "halving", "--verifier",
                 "equations", "--n", "4", "--max-iterations", "3", "--max-step-tokens", "6", "--max-tokens", "12",
                 "--limit", "2", "--dtype", "float32", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    records = read_results(out)
    assert [r["strategy"] for r in records] == ["halving", "halving"]
    assert records[0]["settings"]["verifier"] == "equations"


def test_registering_checks_what_it_is_given():
    with pytest.raises(ValueError, match="'beam_search' is a built-in strategy"):
        register_strategy("beam_search", Halving)
    with pytest.raises(TypeError, match="not a subclass of ttsearch.Strategy"):
        register_strategy("mine", dict)
    with pytest.raises(ValueError, match="'arithmetic' is not a free verifier name"):
        register_verifier("arithmetic", EquationsVerifier)
    with pytest.raises(ConfigError, match="strategy='nope': expected one of"):
        SearchConfig(strategy="nope")
