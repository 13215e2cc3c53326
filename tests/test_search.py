"""The strategies on a scripted policy and verifier whose steps and scores are known, so
every iteration's kept, forked, pruned and finished beams can be checked exactly against
search-and-learn's rules (``src/sal/search/{beam_search,dvts,best_of_n}.py``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from ttsearch.engine.step_writer import StepResult
from ttsearch.eval.datasets import Problem
from ttsearch.eval.selection import budgets, select
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.runner import make_record
from ttsearch.search.scheduler import Job, Scheduler
from ttsearch.search.strategies import SEARCHES


@dataclass(eq=False)
class ScriptedSeq:
    path: tuple  # position in the fork tree: a child's path is its parent's plus its index
    length: int
    freed: bool = False
    preempted: bool = False

    def __len__(self):
        return self.length


class ScriptedTokenizer:
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [1] * 5


@dataclass
class ScriptedPolicy:
    """Each step's text names the path that wrote it (``<1/0>``); ``eos`` lists paths whose
    step ends the answer, ``cut`` those cut by a token limit, ``texts`` other texts for a
    path. Tracks live sequences so leaks show."""

    eos: set = field(default_factory=set)
    cut: set = field(default_factory=set)
    texts: dict = field(default_factory=dict)
    step_tokens: dict = field(default_factory=dict)  # path name or root ("r0") -> tokens per step (default 1)
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

    def name(self, seq):
        return "/".join(map(str, seq.path[1:]))

    @property
    def blocks(self):  # the block accounting the scheduler reads: a block per live sequence
        return SimpleNamespace(num_used=len(self.live), num_available=10**6, num_blocks=10**6)


class ScriptedWriter:
    """A step ends after its path's ``step_tokens``; ``tokens`` counts decode steps run and
    ``writes`` every step started: (path name, stop, max_tokens, greedy)."""

    def __init__(self, policy):
        self.policy = policy
        self.writing = {}  # id(seq) -> [seq, tokens left, stop, tokens written]
        self.tokens = 0
        self.writes = []

    def __len__(self):
        return len(self.writing)

    def add(self, seqs, sampling=None, stop="\n\n", max_tokens=256):
        for s in seqs:
            assert not s.freed and id(s) not in self.writing
            name = self.policy.name(s)
            tokens = self.policy.step_tokens.get(name, self.policy.step_tokens.get(s.path[0], 1))
            self.writing[id(s)] = [s, min(tokens, max_tokens), stop, 0]
            self.writes.append((name, stop, max_tokens, sampling.temperature == 0))

    def remove(self, seqs):
        """Take steps out unfinished (an early stop): what they wrote so far."""
        out = []
        for s in seqs:
            entry = self.writing.pop(id(s), None)
            if entry is not None:
                out.append(SimpleNamespace(seq=s, written=[7] * entry[3]))
        return out

    def advance(self):
        self.tokens += 1
        ended = []
        for key, entry in list(self.writing.items()):
            s, _, stop, _ = entry
            assert not s.freed
            s.length += 1
            entry[1] -= 1
            entry[3] += 1
            if entry[1] == 0:
                del self.writing[key]
                name = self.policy.name(s)
                text = self.policy.texts.get(name, f"<{name}> ")
                if name in self.policy.eos or stop is None:  # without a stop a step runs to EOS
                    reason = "eos"
                elif name in self.policy.cut:
                    reason = "length"
                else:
                    reason = "stop"
                ended.append((s, StepResult([7] * entry[3], text, reason)))
        return ended


@dataclass
class ScriptedState:
    step_scores: list = field(default_factory=list)
    aggregate: float | None = None
    freed: bool = False
    seq: None = None


class ScriptedVerifier:
    """Scores a step by the path that wrote it (``scores[path]``, default 0.5); aggregate =
    last. Each step costs it 2 tokens."""

    engine = None

    def __init__(self, scores):
        self.scores = scores
        self.live = 0
        self.last_tokens = []

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

    def blocks_to_start(self, question):
        return 0

    def blocks_to_score(self, states):
        return 0

    def score(self, states, steps, policy_seqs=None):
        out = []
        for state, seq in zip(states, policy_seqs):
            name = "/".join(map(str, seq.path[1:]))
            s = self.scores.get(name, 0.5)
            state.step_scores.append(s)
            state.aggregate = s
            out.append(s)
        self.last_tokens = [2] * len(states)
        return out


def run_one(strategy, scores, eos=(), cut=(), texts=None, step_tokens=None, **settings):
    config = SearchConfig(strategy=strategy, **settings)
    policy = ScriptedPolicy(eos=set(eos), cut=set(cut), texts=texts or {}, step_tokens=step_tokens or {})
    verifier = ScriptedVerifier(scores)
    search = SEARCHES[strategy](policy, verifier, config, [1] * 5, "q")
    job, writer = drive(search, policy, verifier)
    return search, job, writer


def drive(search, policy, verifier):
    """Run one search to its end through the scheduler; check nothing leaked."""
    scheduler = Scheduler(policy, verifier)
    job = Job(Problem(id="p", question="q", answer="7"), search, sampling=SimpleNamespace(temperature=0.8))
    assert scheduler.add(job)
    while scheduler.jobs:
        scheduler.step()
    assert not policy.live and verifier.live == 0, "a search leaked sequences or verifier states"
    return job, scheduler.writer


def texts(beams):
    return [b.text for b in beams]


# ----------------------------------------------------------------------------- beam search


def test_beam_search_keeps_the_best_n_over_m_refills_n_and_writes_to_eos_last():
    # iteration 1: roots 0..3 score 0.1, 0.9, 0.5, 0.7 -> keep beams 1 and 3, each duplicated twice
    scores = {"0": 0.1, "1": 0.9, "2": 0.5, "3": 0.7, "1/0": 0.2, "1/1": 0.3, "3/0": 0.8, "3/1": 0.6,
              "3/1/0": 0.95, "1/0/1": 0.05}
    search, job, writer = run_one("beam_search", scores, eos={"1/1", "3/0"}, n=4, beam_width=2, max_iterations=3,
                                  max_tokens=50, max_step_tokens=9)
    first, second, third = search.trace
    assert first["kept"] == [1, 3] and first["pruned"] == [2, 0]
    assert first["forked"] == {1: [4, 5], 3: [6, 7]}
    # iteration 2: 1/1 and 3/0 finish; the two open beams both survive and refill n = 4
    assert second["finished"] == [5, 6] and second["kept"] == [4, 7]
    assert second["forked"] == {4: [8, 9], 7: [10, 11]}
    # iteration 3 is the last: every beam writes to EOS with the max_tokens budget
    assert sorted(third["finished"]) == [8, 9, 10, 11] and search.done and search.iteration == 3
    steps = {(name, stop, limit) for name, stop, limit, _ in writer.writes}
    assert {s for s in steps if s[0].count("/") == 2} == {(n, None, 50) for n in ("1/0/0", "1/0/1", "3/1/0", "3/1/1")}
    assert {s for s in steps if s[0].count("/") < 2} == {(n, "\n\n", 9) for n in
                                                         ("0", "1", "2", "3", "1/0", "1/1", "3/0", "3/1")}
    # six completions; the answers are the n = 4 best by aggregate (ties: the earlier)
    assert len(search.completions) == 6
    assert texts(search.answers) == ["<3> <3/1> <3/1/0> ", "<3> <3/0> ", "<1> <1/0> <1/0/0> ", "<3> <3/1> <3/1/1> "]
    record = make_record(job)
    assert record["finished"] == 6 and [c["aggregate"] for c in record["completions"]] == [0.95, 0.8, 0.5, 0.5]
    assert record["rules"]["semantics"] == "search-and-learn" and list(record["selections"]["naive"]) == ["4"]
    # 4 + 4 + 4 one-token steps, 2 verifier tokens each
    assert record["tokens_generated"] == 12 and record["tokens_verified"] == 12 * 2


def test_beam_search_answers_are_the_first_n_without_sort_completed():
    search, _, _ = run_one("beam_search", {"3/1/0": 0.95}, eos={"1/1", "3/0"}, n=4, beam_width=2,
                           max_iterations=3, sort_completed=False,
                           **{"max_tokens": 50})
    assert [b.beam_id for b in search.answers] == [b.beam_id for b in search.completions[:4]]


def test_a_lone_survivor_is_duplicated_to_refill_n():
    search, _, _ = run_one("beam_search", {}, eos={"0", "1", "2"}, n=4, beam_width=2, max_iterations=2)
    first, second = search.trace
    assert first["finished"] == [0, 1, 2] and first["kept"] == [3] and first["forked"] == {3: [4, 5, 6, 7]}
    assert len(search.completions) == 7 and len(search.answers) == 4


def test_uneven_refill_gives_the_first_survivors_one_copy_more():
    # n = 4, M = 1: three open beams survive; (survivors * 2)[:4] = 1, 2, 3, 1
    search, _, _ = run_one("beam_search", {}, eos={"0"}, n=4, beam_width=1, max_iterations=2)
    assert search.trace[0]["forked"] == {1: [4, 5], 2: [6], 3: [7]}


def test_a_length_cut_or_an_empty_step_completes_a_beam():
    search, _, _ = run_one("beam_search", {}, cut={"0"}, texts={"1": ""}, n=4, beam_width=2, max_iterations=3)
    assert {b.beam_id: b.finish for b in search.completions[:2]} == {0: "length", 1: "empty"}
    assert search.trace[0]["finished"] == [0, 1]
    # ours: a length cut is not an answer
    search, job, _ = run_one("beam_search", {}, cut={"0"}, n=4, beam_width=2, max_iterations=3, drop_length_cuts=True)
    assert [b.beam_id for b in search.unfinished] == [0] and all(b.finish != "length" for b in search.completions)
    assert make_record(job)["rules"] == {"semantics": "modified", "stop_at_n_finished": False,
                                         "drop_length_cuts": True, "sort_completed": True, "filter_duplicates": False}


def test_beam_search_without_open_beams_ends_early():
    search, _, _ = run_one("beam_search", {}, eos={"0", "1", "2", "3"}, n=4, beam_width=2, max_iterations=10)
    assert search.iteration == 1 and len(search.completions) == 4


def test_stop_at_n_finished_is_an_option():
    # n = 2 paths have finished after iteration 2 (0 and 1/0), while 1/1 is still open
    eos = {"0", "1/0"}
    search, _, _ = run_one("beam_search", {}, eos=eos, n=2, beam_width=2, max_iterations=3)
    assert search.iteration == 3 and len(search.completions) == 4  # search-and-learn: goes on while beams are open
    search, _, _ = run_one("beam_search", {}, eos=eos, n=2, beam_width=2, max_iterations=3, stop_at_n_finished=True)
    assert search.iteration == 2 and len(search.completions) == 2


def test_filter_duplicates_ranks_only_the_first_of_equal_texts():
    # beams 0 and 1 wrote the same text; 1 scores best but is a duplicate of 0
    same = {"0": "<x> ", "1": "<x> "}
    scores = {"0": 0.2, "1": 0.9, "2": 0.5, "3": 0.4}
    search, _, _ = run_one("beam_search", scores, texts=same, n=4, beam_width=2, max_iterations=2,
                           filter_duplicates=True)
    assert search.trace[0]["kept"] == [2, 3] and sorted(search.trace[0]["pruned"]) == [0, 1]
    search, _, _ = run_one("beam_search", scores, texts=same, n=4, beam_width=2, max_iterations=2)
    assert search.trace[0]["kept"] == [1, 2]


def test_beam_search_lookahead_ranks_by_the_rollout_in_the_shared_batch():
    # without lookahead beam 0 (0.9) would win; its greedy rollout scores 0.1, beam 1's 0.95
    scores = {"0": 0.9, "1": 0.2, "0/0": 0.1, "1/0": 0.95}
    search, job, writer = run_one("beam_search", scores, n=2, beam_width=2, max_iterations=2, lookahead=1)
    assert search.trace[0]["kept"] == [1]
    rollouts = [w for w in writer.writes if w[0] in ("0/0", "1/0") and w[3]]
    assert len(rollouts) == 2  # written greedily, by the scheduler, counted in the job's tokens
    record = make_record(job)
    assert record["tokens_verified"] == 2 * (2 + 2 + 2)  # two steps, two rollout steps, two last steps


# ----------------------------------------------------------------------------- DVTS


def test_dvts_keeps_the_best_candidate_per_subtree_and_ends_a_subtree_when_it_finishes():
    # two subtrees of width 2: roots 0, 1 (subtree 0) and 2, 3 (subtree 1)
    scores = {"0": 0.2, "1": 0.3, "2": 0.9, "3": 0.8, "1/0": 0.1, "1/1": 0.4, "2/0": 0.5, "2/1": 0.6}
    search, job, writer = run_one("dvts", scores, eos={"2/1"}, n=4, beam_width=2, max_iterations=3, max_tokens=30)
    first, second, third = search.trace
    # the globally best beams (2, 3) are in one subtree; DVTS keeps one per subtree
    assert first["kept"] == [1, 2] and sorted(first["pruned"]) == [0, 3]
    # subtree 1's best candidate 2/1 finished: the subtree ends, and its unfinished 2/0 is no answer
    assert second["kept"] == [5] and second["finished"] == [7] and sorted(second["pruned"]) == [4, 6]
    # the last iteration writes subtree 0's candidates to EOS: both answer
    assert sorted(third["finished"]) == [8, 9] and search.done
    assert texts(search.completions) == ["<2> <2/1> ", "<1> <1/1> <1/1/0> ", "<1> <1/1> <1/1/1> "]
    assert [b.subtree for b in search.completions] == [1, 0, 0]
    assert texts(search.unfinished) == ["<2> <2/0> "]
    assert {(name, stop, limit) for name, stop, limit, _ in writer.writes if name.count("/") == 2} == {
        ("1/1/0", None, 30), ("1/1/1", None, 30)}
    record = make_record(job)
    assert record["unfinished"] == 1 and len(record["completions"]) == 3
    assert list(record["selections"]["naive"]) == ["1", "2", "4"]  # subsampled below n, labelled in reports


def test_dvts_answers_at_most_n_and_never_an_unfinished_path():
    # every step of every path ends at EOS: a subtree ends at its first iteration
    search, _, _ = run_one("dvts", {}, eos={"0", "1", "2", "3"}, n=4, beam_width=2, max_iterations=40)
    assert search.iteration == 1 and len(search.completions) == 4
    for iterations in (1, 2, 5):
        search, _, _ = run_one("dvts", {}, n=8, beam_width=4, max_iterations=iterations)
        assert search.iteration == iterations and len(search.completions) == 8
        assert all(b.finish == "eos" for b in search.completions)


def test_dvts_ends_a_subtree_whose_path_holds_a_boxed_answer():
    boxed = {"1": "The answer is \\boxed{7}."}
    search, _, _ = run_one("dvts", {"1": 0.9}, texts=boxed, n=2, beam_width=2, max_iterations=10)
    assert search.iteration == 1 and texts(search.completions) == ["The answer is \\boxed{7}."]
    assert texts(search.unfinished) == ["<0> "]


def test_dvts_lookahead_ranks_candidates_by_their_rollouts():
    scores = {"0": 0.9, "1": 0.2, "0/0": 0.1, "1/0": 0.95}
    search, _, _ = run_one("dvts", scores, n=2, beam_width=2, max_iterations=2, lookahead=1)
    assert search.trace[0]["kept"] == [1]


# ----------------------------------------------------------------------------- best-of-N


def test_best_of_n_writes_each_sample_to_eos_within_max_tokens():
    # sample 1's steps are cut by the step limit: that only ends a step, not the sample
    search, _, _ = run_one("best_of_n", {}, eos={"0"}, cut={"1"}, n=3, max_tokens=3, max_iterations=1)
    assert [b.beam_id for b in search.completions] == [0, 1, 2]
    assert [b.finish for b in search.completions] == ["eos", "length", "length"]  # 3 one-token steps each
    assert [len(b.steps) for b in search.completions] == [1, 3, 3]  # max_iterations is not a best-of-N limit


def test_best_of_n_samples_do_not_wait_for_each_other():
    # sample 0 writes 3-token steps, sample 1 one-token steps; each is scored as its step ends
    search, _, writer = run_one("best_of_n", {}, step_tokens={"0": 3}, n=2, max_tokens=6)
    assert writer.tokens == 6
    assert [len(b.steps) for b in sorted(search.completions, key=lambda b: b.beam_id)] == [2, 6]


def test_a_problem_with_short_steps_does_not_wait_for_another_with_long_ones():
    # two beam searches share one scheduler: problem a's steps take 1 token, problem b's 5
    config = SearchConfig(strategy="beam_search", n=2, beam_width=2, max_iterations=3, max_tokens=5)
    policy, verifier = ScriptedPolicy(step_tokens={"r0": 1, "r1": 5}), ScriptedVerifier({})
    scheduler = Scheduler(policy, verifier)
    jobs = [Job(Problem(id=pid, question="q", answer="7"), SEARCHES["beam_search"](policy, verifier, config, [1] * 5, "q"),
                sampling=SimpleNamespace(temperature=0.8)) for pid in "ab"]
    for job in jobs:
        assert scheduler.add(job)
    done_at = {}
    while scheduler.jobs:
        for job in scheduler.step():
            done_at[job.problem.id] = scheduler.writer.tokens
    # a ran its three iterations while b was still writing its first step
    assert done_at == {"a": 3, "b": 15}
    assert [job.search.iteration for job in jobs] == [3, 3]
    assert not policy.live and verifier.live == 0
    stats = scheduler.stats
    assert stats.decode_steps == 15 and stats.occupancy == 1.0  # every live beam decoded at every token


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"strategy": "beam_search", "n": 6, "beam_width": 4}, "n=6 is not a multiple of beam_width=4"),
        ({"strategy": "greedy"}, "strategy='greedy'"),
        ({"aggregation": "max"}, "aggregation='max'"),
        ({"n": 0}, "n=0"),
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"max_step_tokens": -1}, "max_step_tokens=-1"),
        ({"sort_completed": "yes"}, "sort_completed='yes'"),
        ({"strategy": "compute_optimal"}, "optimal_table"),
        ({"strategy": "best_of_n", "lookahead": 2}, "lookahead"),
    ],
)
def test_bad_configs_name_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**settings)


def test_unknown_setting_in_a_config_file():
    with pytest.raises(ConfigError, match="unknown setting.*beams"):
        SearchConfig.from_dict({"beams": 4}, source="c.yaml")


def test_step_limit_is_max_tokens_unless_max_step_tokens_is_given():
    assert SearchConfig(max_tokens=300).step_tokens == 300
    assert SearchConfig(max_tokens=300, max_step_tokens=40).step_tokens == 40


def test_search_and_learn_recipe_keys_map_to_ours():
    from ttsearch.search.config import split_settings

    recipe = {"approach": "dvts", "n": 16, "beam_width": 4, "num_iterations": 12, "lookahead": 1,
              "agg_strategy": "prod", "temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "system_prompt": "S",
              "sort_completed": False, "filter_duplicates": True, "seed": 3, "num_samples": 5,
              "dataset_start": 10, "dataset_end": 30, "custom_chat_template": "{{ messages }}",
              "prm_batch_size": 4, "search_batch_size": 25, "output_dir": "data/x", "push_to_hub": False}
    with pytest.warns(UserWarning, match=r"ignored.*prm_batch_size.*search_batch_size.*output_dir.*push_to_hub"):
        search, run = split_settings(recipe, "r.yaml")
    config = SearchConfig.from_dict(search, "r.yaml")
    assert (config.strategy, config.n, config.beam_width, config.max_iterations, config.lookahead) == ("dvts", 16, 4, 12, 1)
    assert (config.aggregation, config.temperature, config.top_p, config.max_tokens) == ("prod", 0.7, 0.9, 512)
    assert (config.sort_completed, config.filter_duplicates, config.seed) == (False, True, 3)
    assert config.chat_template == "{{ messages }}" and config.system_prompt == "S"
    assert run == {"limit": 5, "start": 10, "end": 30}


@pytest.mark.parametrize("recipe, message", [
    ({"approach": "dvts", "beams": 4}, "unknown setting 'beams'"),
    ({"approach": "dvts", "strategy": "beam_search"}, "'strategy' and another key both set 'strategy'"),
    ({"num_samples": -1}, "limit=-1"),
])
def test_bad_recipe_keys(recipe, message):
    from ttsearch.search.config import split_settings

    with pytest.raises(ConfigError, match=message):
        split_settings(recipe, "r.yaml")


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
    search, job, _ = run_one("best_of_n", {"0": 0.2, "1": 0.9, "2": 0.5}, eos={"0", "1", "2"}, n=3)
    for beam, answer in zip(search.completions, ["7", "5", "7"]):
        beam.steps.append(f"The answer is \\boxed{{{answer}}}.")
    record = make_record(job)
    assert record["selections"]["naive"]["1"] == {"answer": "7", "correct": True}
    assert record["selections"]["naive"]["3"] == {"answer": "5", "correct": False}
    assert record["selections"]["majority"]["3"] == {"answer": "7", "correct": True}
    assert record["selections"]["weighted"]["2"]["answer"] == "5"  # 0.9 against 0.2


def test_reports_draw_beam_search_from_its_own_runs_and_label_subsampled_dvts():
    from ttsearch.eval.report import accuracy_rows

    def record(pid, strategy, n, correct_at):
        return {"id": pid, "strategy": strategy, "n": n, "beam_width": 4, "tokens_generated": 10 * n,
                "tokens_verified": n, "selections": {"naive": {str(b): {"correct": c} for b, c in correct_at.items()}}}

    records = [record("a", "beam_search", 4, {4: True}), record("a", "beam_search", 16, {16: False}),
               record("a", "dvts", 16, {4: True, 16: True}), record("a", "best_of_n", 16, {4: False, 16: True}),
               record("a", "best_of_n", 4, {4: True})]
    rows = {(r["run"], r["N"]): r for r in accuracy_rows(records)}
    assert set(rows) == {("beam_search M=4", 4), ("beam_search M=4", 16), ("dvts M=4 (subsampled)", 4),
                         ("dvts M=4", 16), ("best_of_n", 4), ("best_of_n", 16)}
    assert rows["beam_search M=4", 4]["accuracy"] == 1 and rows["beam_search M=4", 16]["accuracy"] == 0
    assert rows["best_of_n", 4]["accuracy"] == 1 and rows["best_of_n", 4]["problems"] == 1  # its own n=4 run
    assert rows["beam_search M=4", 16]["tokens_per_problem"] == 176
    assert rows["dvts M=4 (subsampled)", 4]["tokens_per_problem"] is None


# ----------------------------------------------------------------------------- compute-optimal


def fake_record(pid, strategy, n, first_scores, correct_at):
    """A run record: ``correct_at`` maps budget -> correct (naive selection)."""
    return {"id": pid, "strategy": strategy, "n": n, "beam_width": 2 if strategy != "best_of_n" else 4,
            "first_step_scores": first_scores,
            "selections": {"naive": {str(b): {"answer": "1", "correct": c} for b, c in correct_at.items()}}}


def test_fit_picks_the_best_strategy_per_difficulty_bin(tmp_path):
    from ttsearch.search.strategies.compute_optimal import choose, fit_table

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

    from ttsearch.search.strategies.compute_optimal import ComputeOptimal

    table = {"version": 1, "pilot_samples": 2, "edges": [0.5], "budgets": {"4": [
        {"strategy": "beam_search", "n": 4, "beam_width": 2, "selection": "naive", "accuracy": 1, "problems": 1},
        {"strategy": "best_of_n", "n": 4, "beam_width": 4, "selection": "naive", "accuracy": 1, "problems": 1},
    ]}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    config = SearchConfig(strategy="compute_optimal", n=4, beam_width=2, pilot_samples=2, optimal_table=str(path),
                          max_iterations=3, max_tokens=3)
    for pilot_score, expected in ((0.2, "beam_search"), (0.8, "best_of_n")):
        policy, verifier = ScriptedPolicy(), ScriptedVerifier({"0": pilot_score, "1": pilot_score})
        search = ComputeOptimal(policy, verifier, config, [1] * 5, "q", table)
        job, _ = drive(search, policy, verifier)
        assert search.choice["strategy"] == expected and search.pilot_level == pytest.approx(pilot_score)
        assert make_record(job)["first_step_scores"] == [pilot_score, pilot_score]
        assert len(search.answers) == 4
