"""The strategies on a scripted policy and verifier whose steps and scores are known, so
every iteration's kept, forked, pruned and finished beams can be checked exactly."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from dataclasses import dataclass, field

import pytest

from ttsearch.engine.engine import StepResult
from ttsearch.eval.datasets import Problem
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.runner import Job, Scheduler, make_record
from ttsearch.search.selection import budgets, select
from ttsearch.search.strategies import SEARCHES


@dataclass(eq=False)
class ScriptedSeq:
    path: tuple  # position in the fork tree: a child's path is its parent's plus its index
    length: int
    freed: bool = False

    def __len__(self):
        return self.length


class ScriptedTokenizer:
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [1] * 5


@dataclass
class ScriptedPolicy:
    """Each step's text names the path that wrote it; ``eos`` lists paths whose step ends
    the answer. Tracks live sequences so leaks show."""

    eos: set = field(default_factory=set)
    step_tokens: dict = field(default_factory=dict)  # root ("r0", "r1"...) -> tokens per step (default 1)
    live: set = field(default_factory=set)
    max_model_len: int = 10_000
    block_size: int = 16
    tokenizer: ScriptedTokenizer = field(default_factory=ScriptedTokenizer)
    roots: itertools.count = field(default_factory=itertools.count)

    def add(self, ids):
        seq = ScriptedSeq((f"r{next(self.roots)}",), len(ids))
        self.live.add(id(seq))
        return seq

    def fork(self, seq, k):
        assert not seq.freed
        kids = [ScriptedSeq(seq.path + (i,), seq.length) for i in range(k)]
        self.live.update(id(c) for c in kids)
        return kids

    def free(self, seq):
        assert not seq.freed, "freed twice"
        seq.freed = True
        self.live.discard(id(seq))

    def step_writer(self, stop="\n\n", max_tokens=256):
        return ScriptedWriter(self)

    def generate_step(self, seqs, sampling, stop="\n\n", max_tokens=256):
        writer = self.step_writer(stop, max_tokens)
        writer.add(seqs, sampling)
        ended = {}
        while len(ended) < len(seqs):
            ended.update((id(seq), result) for seq, result in writer.advance())
        return [ended[id(seq)] for seq in seqs]

    def step_text(self, seq):
        return "/".join(map(str, seq.path[1:]))

    @property
    def blocks(self):  # the block accounting the scheduler reads: a block per live sequence
        return SimpleNamespace(num_used=len(self.live), num_available=10**6)


class ScriptedWriter:
    """A step ends after its root's ``policy.step_tokens``; ``tokens`` counts decode steps run."""

    def __init__(self, policy):
        self.policy = policy
        self.writing = {}  # id(seq) -> [seq, tokens left]
        self.tokens = 0

    def __len__(self):
        return len(self.writing)

    def add(self, seqs, sampling=None):
        for s in seqs:
            assert not s.freed and id(s) not in self.writing
            self.writing[id(s)] = [s, self.policy.step_tokens.get(s.path[0], 1)]

    def advance(self):
        self.tokens += 1
        ended = []
        for key, entry in list(self.writing.items()):
            s = entry[0]
            assert not s.freed
            s.length += 1
            entry[1] -= 1
            if entry[1] == 0:
                del self.writing[key]
                name = self.policy.step_text(s)
                ended.append((s, StepResult([7], f"<{name}> ", "eos" if name in self.policy.eos else "stop")))
        return ended


@dataclass
class ScriptedState:
    step_scores: list = field(default_factory=list)
    aggregate: float | None = None
    freed: bool = False


class ScriptedVerifier:
    """Scores a step by the path that wrote it (``scores[path]``, default 0.5); aggregate = last."""

    def __init__(self, scores):
        self.scores = scores
        self.live = 0

    def new(self, question, policy_seq=None):
        self.live += 1
        return ScriptedState()

    def fork(self, state, k):
        self.live += k
        return [ScriptedState(list(state.step_scores), state.aggregate) for _ in range(k)]

    def free(self, state):
        assert not state.freed
        state.freed = True
        self.live -= 1

    def score(self, states, steps, policy_seqs=None):
        out = []
        for state, text in zip(states, steps):
            s = self.scores.get(text.strip()[1:-1], 0.5)
            state.step_scores.append(s)
            state.aggregate = s
            out.append(s)
        return out


def run_one(strategy, scores, eos=(), **settings):
    config = SearchConfig(strategy=strategy, **settings)
    policy, verifier = ScriptedPolicy(eos=set(eos)), ScriptedVerifier(scores)
    search = SEARCHES[strategy](policy, verifier, config, [1] * 5, "q")
    drive(search, policy, verifier, config)
    return search


def drive(search, policy, verifier, config):
    """Run one search to its end through the scheduler; check nothing leaked. Returns its job."""
    scheduler = Scheduler(policy, verifier, config)
    job = Job(Problem(id="p", question="q", answer="7"), search, sampling=None, started=0.0)
    scheduler.add(job)
    while scheduler.jobs:
        scheduler.step()
    assert not policy.live and verifier.live == 0, "a search leaked sequences or verifier states"
    return job


def test_beam_search_keeps_the_best_n_over_m_and_forks_them():
    # iteration 1: roots 0..3 score 0.1, 0.9, 0.5, 0.7 -> keep beams 1 and 3, each forks 2 ways
    scores = {"0": 0.1, "1": 0.9, "2": 0.5, "3": 0.7,
              "1/0": 0.2, "1/1": 0.3, "3/0": 0.8, "3/1": 0.6}
    eos = {"3/0/0", "3/0/1", "3/1/0", "3/1/1"}
    search = run_one("beam_search", scores, eos, n=4, beam_width=2, max_iterations=10)
    first, second, third = search.trace
    assert first["kept"] == [1, 3] and first["pruned"] == [2, 0]
    assert first["forked"] == {1: [4, 5], 3: [6, 7]}
    # iteration 2: 3/0 (0.8) and 3/1 (0.6) beat 1/1 (0.3) and 1/0 (0.2)
    assert second["kept"] == [6, 7] and second["pruned"] == [5, 4]
    # iteration 3: all four children of the 3-subtree finish: n answers, the search stops
    assert sorted(third["finished"]) == [8, 9, 10, 11] and third["kept"] == []
    assert [b.text for b in search.completions] == ["<3> <3/0> <3/0/0> ", "<3> <3/0> <3/0/1> ",
                                                    "<3> <3/1> <3/1/0> ", "<3> <3/1> <3/1/1> "]


def test_beam_search_stops_at_the_iteration_limit_without_counting_cut_paths_as_answers():
    search = run_one("beam_search", {}, n=4, beam_width=2, max_iterations=3)
    assert search.iteration == 3 and search.completions == [] and len(search.unfinished) == 4


def test_dvts_subtrees_stay_independent():
    # two subtrees of width 2: roots 0,1 (subtree 0) and 2,3 (subtree 1)
    scores = {"0": 0.2, "1": 0.3, "2": 0.9, "3": 0.8, "1/0": 0.1, "1/1": 0.4, "2/0": 0.5, "2/1": 0.6}
    eos = {"1/1/0", "1/1/1", "2/1/0", "2/1/1"}
    search = run_one("dvts", scores, eos, n=4, beam_width=2, max_iterations=10)
    first, second, third = search.trace
    # the globally best beams (2, 3) are in one subtree; DVTS keeps one per subtree
    assert first["kept"] == [1, 2] and sorted(first["pruned"]) == [0, 3]
    assert second["kept"] == [5, 7]  # 1/1 (0.4) in subtree 0, 2/1 (0.6) in subtree 1
    assert sorted(third["finished"]) == [8, 9, 10, 11]
    subtrees = sorted(b.subtree for b in search.completions)
    assert subtrees == [0, 0, 1, 1]
    for b in search.completions:  # every path descends from its own subtree's roots only
        assert b.text.startswith("<1>" if b.subtree == 0 else "<2>")


def test_dvts_returns_only_finished_solutions():
    search = run_one("dvts", {}, eos={"0/0"}, n=4, beam_width=2, max_iterations=4)
    assert all(b.finish == "eos" for b in search.completions)
    assert [b.text for b in search.completions] == ["<0> <0/0> "]


def test_best_of_n_keeps_every_sample_to_its_end():
    search = run_one("best_of_n", {}, eos={"0", "2/"}, n=3, max_iterations=3)
    assert [b.text for b in search.completions] == ["<0> "]
    assert len(search.unfinished) == 2
    assert search.trace[0]["finished"] == [0] and search.trace[0]["kept"] == [1, 2]


def test_beam_search_lookahead_ranks_by_the_rollout():
    # without lookahead beam 0 (0.9) would win; its greedy rollout scores 0.1, beam 1's 0.95
    scores = {"0": 0.9, "1": 0.2, "0/0": 0.1, "1/0": 0.95}
    search = run_one("beam_search", scores, n=2, beam_width=2, max_iterations=2, lookahead=1)
    assert search.trace[0]["kept"] == [1]


def test_a_problem_with_short_steps_does_not_wait_for_another_with_long_ones():
    # two beam searches share one scheduler: problem a's steps take 1 token, problem b's 5
    config = SearchConfig(strategy="beam_search", n=2, beam_width=2, max_iterations=3)
    policy, verifier = ScriptedPolicy(step_tokens={"r0": 1, "r1": 5}), ScriptedVerifier({})
    scheduler = Scheduler(policy, verifier, config)
    jobs = [Job(Problem(id=pid, question="q", answer="7"), SEARCHES["beam_search"](policy, verifier, config, [1] * 5, "q"),
                sampling=None, started=0.0) for pid in "ab"]
    for job in jobs:
        scheduler.add(job)
    done_at = {}
    while scheduler.jobs:
        for job in scheduler.step():
            done_at[job.problem.id] = scheduler.writer.tokens
    # a ran its three iterations while b was still writing its first step
    assert done_at == {"a": 3, "b": 15}
    assert [job.search.iteration for job in jobs] == [3, 3]
    assert [job.tokens_generated for job in jobs] == [6, 6]  # 2 beams x 3 steps, one token id each
    assert not policy.live and verifier.live == 0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"strategy": "beam_search", "n": 6, "beam_width": 4}, "n=6 is not a multiple of beam_width=4"),
        ({"strategy": "greedy"}, "strategy='greedy'"),
        ({"aggregation": "max"}, "aggregation='max'"),
        ({"n": 0}, "n=0"),
        ({"strategy": "compute_optimal"}, "optimal_table"),
        ({"strategy": "dvts", "lookahead": 2}, "lookahead"),
    ],
)
def test_bad_configs_name_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**settings)


def test_unknown_setting_in_a_config_file():
    with pytest.raises(ConfigError, match="unknown setting.*beams"):
        SearchConfig.from_dict({"beams": 4}, source="c.yaml")


# ----------------------------------------------------------------------------- selection


def test_budgets():
    assert budgets(16) == [1, 2, 4, 8, 16] and budgets(6) == [1, 2, 4, 6] and budgets(1) == [1]


def test_selections_on_hand_made_cases():
    candidates = [("2", 0.9), ("3", 0.4), ("3", 0.3), ("4", 0.2), (None, 1.0)]
    assert select(candidates, "naive") == "2"
    assert select(candidates, "majority") == "3"
    assert select(candidates, "weighted") == "2"  # 0.9 against 0.4 + 0.3
    assert select([("3", 0.5), ("3", 0.5), ("2", 0.9)], "weighted") == "3"
    assert select([(None, 0.3)], "naive") is None


def test_selection_groups_equivalent_answers():
    from ttsearch.eval.grading import answer_key

    candidates = [("\\frac{1}{2}", 0.4), ("0.5", 0.4), ("2", 0.7)]
    assert select(candidates, "majority", key=answer_key) == "\\frac{1}{2}"
    assert select(candidates, "weighted", key=answer_key) == "\\frac{1}{2}"


def test_record_selects_at_every_budget():
    search = run_one("best_of_n", {"0": 0.2, "1": 0.9, "2": 0.5}, eos={"0", "1", "2"}, n=3)
    for beam, answer in zip(search.completions, ["7", "5", "7"]):
        beam.steps.append(f"The answer is \\boxed{{{answer}}}.")
    job = Job(Problem(id="p", question="q", answer="7"), search, sampling=None, started=0.0)
    record = make_record(job, SearchConfig(strategy="best_of_n", n=3))
    assert record["selections"]["naive"]["1"] == {"answer": "7", "correct": True}
    assert record["selections"]["naive"]["3"] == {"answer": "5", "correct": False}
    assert record["selections"]["majority"]["3"] == {"answer": "7", "correct": True}
    assert record["selections"]["weighted"]["2"]["answer"] == "5"  # 0.9 against 0.2


# ----------------------------------------------------------------------------- compute-optimal


def fake_record(pid, strategy, n, first_scores, correct_at):
    """A run record: ``correct_at`` maps budget -> correct (naive selection)."""
    return {"id": pid, "strategy": strategy, "n": n, "beam_width": 2 if strategy != "best_of_n" else 4,
            "first_step_scores": first_scores,
            "selections": {"naive": {str(b): {"answer": "1", "correct": c} for b, c in correct_at.items()}}}


def test_fit_picks_the_best_strategy_per_difficulty_bin(tmp_path):
    from ttsearch.search.compute_optimal import choose, fit_table

    records = []
    for i in range(4):  # easy problems (high pilot scores): best-of-N wins
        records.append(fake_record(f"e{i}", "best_of_n", 4, [0.9] * 4, {1: True, 2: True, 4: True}))
        records.append(fake_record(f"e{i}", "beam_search", 4, [0.9] * 4, {4: False}))
    for i in range(4):  # hard problems: beam search wins
        records.append(fake_record(f"h{i}", "best_of_n", 4, [0.1] * 4, {1: False, 2: False, 4: False}))
        records.append(fake_record(f"h{i}", "beam_search", 4, [0.1] * 4, {4: True}))
    table = fit_table(records, pilot_samples=4, bins=2)
    assert choose(table, 4, 0.95)["strategy"] == "best_of_n"
    assert choose(table, 4, 0.05)["strategy"] == "beam_search"
    assert choose(table, 100, 0.05)["n"] == 4  # the largest fitted budget not above 100
    assert choose(table, 2, 0.95) == {**choose(table, 2, 0.95), "strategy": "best_of_n", "n": 2}


def test_compute_optimal_runs_the_strategy_its_pilot_chooses(tmp_path):
    import json

    from ttsearch.search.compute_optimal import ComputeOptimal

    table = {"version": 1, "pilot_samples": 2, "edges": [0.5], "budgets": {"4": [
        {"strategy": "beam_search", "n": 4, "beam_width": 2, "selection": "naive", "accuracy": 1, "problems": 1},
        {"strategy": "best_of_n", "n": 4, "beam_width": 4, "selection": "naive", "accuracy": 1, "problems": 1},
    ]}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    config = SearchConfig(strategy="compute_optimal", n=4, beam_width=2, pilot_samples=2, optimal_table=str(path),
                          max_iterations=3)
    for pilot_score, expected in ((0.2, "beam_search"), (0.8, "best_of_n")):
        policy, verifier = ScriptedPolicy(eos=set()), ScriptedVerifier({"0": pilot_score, "1": pilot_score})
        search = ComputeOptimal(policy, verifier, config, [1] * 5, "q", table)
        job = drive(search, policy, verifier, config)
        assert search.choice["strategy"] == expected and search.pilot_level == pytest.approx(pilot_score)
        assert job.extra["first_step_scores"] == [pilot_score, pilot_score]
