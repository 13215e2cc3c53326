"""Particle filtering, REBASE, early stopping and the tree picture, on the scripted policy and
verifier of test_search: exact traces, no leaked sequence or verifier state after any of them."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from test_search import run_one, texts  # tests/ is on sys.path under pytest
from ttsearch.cli import main
from ttsearch.eval.report import accuracy_rows, early_stop_rows, plot_accuracy, run_label
from ttsearch.eval.tree import TreeError, draw_tree, find_record, layout
from ttsearch.search.config import ConfigError, SearchConfig
from ttsearch.search.runner import make_record
from ttsearch.search.strategies import particle_weights, resample_counts, share_widths


class FixedOffset:
    """An rng whose uniform draw is known: systematic resampling's one random offset."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


# ----------------------------------------------------------------------------- particle filtering


def test_particle_weights_are_a_softmax_of_log_odds_or_of_rewards():
    # log-odds of 0.5 and 0.9 are 0 and log 9: weights 1/10 and 9/10
    np.testing.assert_allclose(particle_weights([0.5, 0.9]), [0.1, 0.9])
    np.testing.assert_allclose(particle_weights([0.5, 0.9], temperature=2.0), [1 / 4, 3 / 4])  # sqrt(9) = 3
    np.testing.assert_allclose(particle_weights([0.0, 1.0], kind="reward"), [1 / (1 + math.e), math.e / (1 + math.e)])
    np.testing.assert_allclose(particle_weights([None, 0.5, 0.5]), [0, 0.5, 0.5])  # an unscored particle weighs 0
    np.testing.assert_allclose(particle_weights([None, None]), [0.5, 0.5])


def test_systematic_resampling_counts_from_a_known_offset():
    w = np.array([0.7, 0.2, 0.1])
    # points (u + i) / 5 against the cumulative weights 0.7, 0.9, 1.0
    assert resample_counts(w, 5, "systematic", FixedOffset(0.9)) == [3, 1, 1]  # 0.18 0.38 0.58 0.78 0.98
    assert resample_counts(w, 5, "systematic", FixedOffset(0.1)) == [4, 1, 0]  # 0.02 0.22 0.42 0.62 0.82
    # every count is the floor or the ceiling of n * w, whatever the offset
    rng = np.random.default_rng(1)
    for _ in range(200):
        counts = resample_counts(w, 7, "systematic", rng)
        assert sum(counts) == 7 and all(math.floor(7 * p) <= c <= math.ceil(7 * p) for c, p in zip(counts, w))


def test_multinomial_resampling_is_seeded_and_unbiased():
    w = np.array([0.5, 0.3, 0.2])
    first = [resample_counts(w, 16, "multinomial", np.random.default_rng(seed)) for seed in range(3)]
    again = [resample_counts(w, 16, "multinomial", np.random.default_rng(seed)) for seed in range(3)]
    assert first == again and all(sum(c) == 16 for c in first)
    rng = np.random.default_rng(0)
    mean = np.mean([resample_counts(w, 16, "multinomial", rng) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(mean, 16 * w, atol=0.15)  # standard error of each mean < 0.04
    with pytest.raises(ValueError, match="resampling='stratified'"):
        resample_counts(w, 4, "stratified", rng)


def test_particle_filter_resamples_forks_and_keeps_finished_particles():
    # step 1: particles 0 and 1 hold all the weight -> two copies each (any offset), 2 and 3 are freed
    # step 2: four equal weights -> one copy each; particle 5 (a copy of 1) finished and stays
    # step 3 is the last: the open particles write to EOS
    scores = {"0": 0.9, "1": 0.9, "2": 1e-9, "3": 1e-9, "0/0": 0.9, "1/0": 0.9}
    search, job, writer = run_one("particle_filter", scores, eos={"1/0"}, n=4, max_iterations=3,
                                  resampling="systematic", max_tokens=50, max_step_tokens=9)
    first, second, third = search.trace
    assert first["kept"] == [0, 1] and first["forked"] == {0: [4], 1: [5]} and first["pruned"] == [2, 3]
    np.testing.assert_allclose(first["weights"], [0.5, 0.5, 0, 0], atol=1e-6)
    assert second["finished"] == [5] and second["kept"] == [0, 4, 1, 5] and second["forked"] == {}
    assert second["weights"] == [0.25] * 4
    assert sorted(third["finished"]) == [0, 1, 4] and search.done and search.iteration == 3
    assert texts(search.answers) == ["<0> <0> <0> ", "<0> <0/0> <0/0> ", "<1> <1> <1> ", "<1> <1/0> "]
    assert {w[0] for w in writer.writes if w[1] is None} == {"0", "0/0", "1"}  # only the last writes to EOS
    record = make_record(job)
    assert record["rules"]["semantics"] == "Puri et al. 2025" and list(record["selections"]["naive"]) == ["4"]
    assert record["tokens_generated"] == 4 + 4 + 3


def test_a_resampled_finished_particle_is_copied_without_a_sequence():
    # particle 0 finishes at once with all the weight: the pool becomes four copies of it
    search, _, _ = run_one("particle_filter", {"0": 0.9, "1": 1e-9, "2": 1e-9, "3": 1e-9}, eos={"0"}, n=4)
    (only,) = search.trace
    assert only["kept"] == [0] and only["forked"] == {0: [4, 5, 6]} and only["pruned"] == [1, 2, 3]
    assert texts(search.answers) == ["<0> "] * 4 and {b.seq for b in search.answers[1:]} == {None}
    assert search.done and len(search.completions) == 1


# ----------------------------------------------------------------------------- REBASE


def test_rebase_widths_follow_the_reward_softmax_and_add_up_to_the_budget():
    # softmax([0.9, 0.5, 0.1] / 0.2) * 4 = 3.467, 0.469, 0.064: floors 3, 0, 0; one more to the largest remainder
    assert share_widths([0.9, 0.5, 0.1], 4, 0.2) == [3, 1, 0]
    assert share_widths([0.9, 0.5, 0.1], 3, 0.2) == [3, 0, 0]  # 2.600, 0.352, 0.048
    assert share_widths([0.5, 0.5, 0.5], 5, 1.0) == [2, 2, 1]  # ties go to the earlier node
    assert share_widths([None, 0.5], 2, 1.0) == [0, 2]
    assert sum(share_widths(list(np.linspace(0, 1, 9)), 16, 0.3)) == 16


def test_rebase_shares_the_budget_left_by_finished_paths():
    scores = {"0": 0.9, "1": 0.5, "2": 0.1, "3": 0.1}
    search, job, writer = run_one("rebase", scores, eos={"3", "0/1"}, n=4, max_iterations=3, balance_temperature=0.2)
    first, second, third = search.trace
    # one finished -> a budget of 3 for the three open nodes: widths 3, 0, 0
    assert first["finished"] == [3] and first["widths"] == [3, 0, 0]
    assert first["kept"] == [0] and first["forked"] == {0: [4, 5, 6]} and first["pruned"] == [1, 2]
    # two finished -> a budget of 2 over two equal open nodes
    assert second["finished"] == [5] and second["widths"] == [1, 1] and second["forked"] == {4: [7], 6: [8]}
    assert sorted(third["finished"]) == [7, 8] and search.done
    assert [b.beam_id for b in search.answers] == [3, 5, 7, 8]
    assert make_record(job)["rules"]["semantics"] == "Wu et al. 2024"


# ----------------------------------------------------------------------------- early stopping


def finishing_one_per_token(answers, scores=None, **settings):
    """best-of-N whose sample i finishes after i + 1 tokens with the answer ``answers[i]``."""
    n = len(answers)
    return run_one("best_of_n", scores or {}, eos={str(i) for i in range(n)},
                   texts={str(i): f"so \\boxed{{{a}}}" for i, a in enumerate(answers)},
                   step_tokens={str(i): i + 1 for i in range(n)}, n=n, **settings)


def test_early_stopping_stops_at_the_token_where_answers_agree():
    search, job, writer = finishing_one_per_token([7, 5, 7, 7], stop_agree=2, stop_window=3)
    # finished answers: 7 (token 1), 5 (token 2), 7 (token 3): two of the last three agree
    assert search.early_stop == {"iteration": 1, "finished": 3, "reason": "2 of the last 3 finished answers are 7",
                                 "open_paths_stopped": 1}
    assert writer.tokens == 3 and [b.beam_id for b in search.unfinished] == [3]
    record = make_record(job)
    assert record["early_stop"]["reason"].startswith("2 of the last 3")
    assert record["tokens_generated"] == 1 + 2 + 3 + 3  # the stopped sample's 3 tokens were work done
    assert record["rules"]["semantics"] == "modified" and record["rules"]["stop_window"] == 3
    assert list(record["selections"]["naive"]) == ["4"]  # a stopped run is no best-of-N at smaller N


def test_without_agreement_nothing_stops():
    search, job, writer = finishing_one_per_token([1, 2, 3, 4], stop_agree=2, stop_window=3)
    assert search.early_stop is None and writer.tokens == 4 and len(search.completions) == 4
    assert "early_stop" not in make_record(job)


def test_the_vote_share_rule_weighs_answers_by_their_scores():
    scores = {"0": 0.9, "1": 0.1, "2": 0.5}
    search, _, writer = finishing_one_per_token([7, 5, 5], scores, stop_share=0.8, stop_window=2)
    assert search.early_stop["reason"] == "7 holds 0.90 of the last 2 finished answers' scores"
    assert writer.tokens == 2
    search, _, writer = finishing_one_per_token([7, 5, 5], scores, stop_share=0.95, stop_window=2)
    assert search.early_stop is None and writer.tokens == 3


def test_early_stopping_frees_a_beam_search_mid_tree():
    boxed = {name: "so \\boxed{7}" for name in ("1", "3")}
    search, job, _ = run_one("beam_search", {}, eos={"1", "3"}, texts=boxed, n=4, beam_width=2, max_iterations=5,
                             stop_agree=2)
    assert search.early_stop["iteration"] == 1 and search.done
    assert search.trace[-1]["early_stop"] and len(search.trace[-1]["pruned"]) == 4  # the refilled beams
    assert [b.beam_id for b in search.answers] == [1, 3]


def test_early_stopping_settings_are_checked():
    with pytest.raises(ConfigError, match="stop_agree=3: cannot exceed stop_window=2"):
        SearchConfig(stop_agree=3, stop_window=2)
    with pytest.raises(ConfigError, match="stop_share=1.5"):
        SearchConfig(stop_share=1.5)
    with pytest.raises(ConfigError, match="resampling='stratified'"):
        SearchConfig(strategy="particle_filter", resampling="stratified")
    with pytest.raises(ConfigError, match="balance_temperature=0"):
        SearchConfig(strategy="rebase", balance_temperature=0)
    assert SearchConfig(stop_agree=3).agreement_window == 3 and SearchConfig(stop_share=0.7).agreement_window == 2


def test_eval_pairs_early_stopped_runs_with_the_same_search_without():
    _, stopped, _ = finishing_one_per_token([7, 5, 7, 7], stop_agree=2, stop_window=3)
    _, full, _ = finishing_one_per_token([7, 5, 7, 7])
    with_stop, without = make_record(stopped), make_record(full)
    assert run_label(with_stop) == "best_of_n +stop 2/3 agree"
    (row,) = early_stop_rows([without, with_stop])
    assert row["run"] == "best_of_n +stop 2/3 agree" and row["stopped_early"] == 1
    # tokens generated + verified (2 per scored step): the stopped run scored 3 steps, the full one 4
    assert row["tokens_per_problem"] == 9 + 3 * 2 and row["tokens_without"] == 10 + 4 * 2
    assert row["saved"] == pytest.approx(1 - 15 / 18) and row["accuracy"] == row["accuracy_without"] == 1


# ----------------------------------------------------------------------------- the tree picture


def beam_search_record():
    scores = {"0": 0.1, "1": 0.9, "2": 0.5, "3": 0.7, "1/0": 0.2, "1/1": 0.3, "3/0": 0.8, "3/1": 0.6,
              "3/1/0": 0.95, "1/0/1": 0.05}
    answers = {"3/0": "so \\boxed{7}", "3/1/0": "so \\boxed{7}", "1/1": "so \\boxed{4}"}
    _, job, _ = run_one("beam_search", scores, eos={"1/1", "3/0"}, texts=answers, n=4, beam_width=2,
                        max_iterations=3, max_tokens=50, max_step_tokens=9)
    return make_record(job)


def test_records_keep_each_steps_parent():
    record = beam_search_record()
    nodes = {node["id"]: node for node in record["nodes"]}
    assert len(nodes) == 12  # four beams write a step in each of three iterations
    by_text = {node["text"]: node for node in record["nodes"]}
    assert nodes[by_text["<3/1/1> "]["parent"]]["text"] == "<3/1> "
    assert nodes[by_text["<3/1> "]["parent"]]["text"] == "<3> " and by_text["<3> "]["parent"] is None
    best = record["completions"][0]
    assert best["aggregate"] == 0.95 and nodes[best["node"]]["text"] == "so \\boxed{7}"


def test_the_tree_is_drawn_with_a_node_per_step(tmp_path):
    record = beam_search_record()
    drawing = draw_tree(record, tmp_path / "tree.svg")
    svg = ET.parse(drawing.path).getroot()
    groups = {g.get("id"): g for g in svg.iter("{http://www.w3.org/2000/svg}g")}
    drawn = [e for e in groups["steps"].iter() if e.tag.endswith("use")]
    assert len(drawn) == drawing.nodes == 12
    # answers marked by their grade against the reference 7: two correct, two wrong
    assert sum(1 for e in groups["answers-correct"].iter() if e.tag.endswith("use")) == 2
    assert sum(1 for e in groups["answers-wrong"].iter() if e.tag.endswith("use")) == 2
    texts_of = {node["id"]: node["text"] for node in record["nodes"]}
    assert [texts_of[i] for i in drawing.chosen_path] == ["<3> ", "<3/1> ", "so \\boxed{7}"]
    assert draw_tree(record, tmp_path / "tree.png").path.stat().st_size > 0


def test_layout_puts_parents_between_their_children():
    nodes = [{"id": 0, "parent": None}, {"id": 1, "parent": 0}, {"id": 2, "parent": 0}, {"id": 3, "parent": None}]
    assert layout(nodes) == {1: (2, 0.0), 2: (2, 1.0), 0: (1, 0.5), 3: (1, 2.0)}


def test_tree_command_picks_one_search_and_names_the_choices(tmp_path, capsys):
    record = beam_search_record()
    other = dict(record, n=8)
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")
    assert main(["tree", str(path), "--problem", "p", "--n", "4", "--output", str(tmp_path / "t.png")]) == 0
    assert "12 steps, 4 answers" in capsys.readouterr().out
    assert main(["tree", str(path), "--problem", "p", "--output", str(tmp_path / "t.png")]) == 2
    assert "choose one of: --strategy beam_search --n 4, --strategy beam_search --n 8" in capsys.readouterr().err
    with pytest.raises(TreeError, match="no record for problem 'q'"):
        find_record([record], "q")
    with pytest.raises(TreeError, match="holds no tree"):
        draw_tree({k: v for k, v in record.items() if k != "nodes"}, tmp_path / "x.png")


def test_plot_draws_accuracy_against_tokens_beside_n(tmp_path):
    record = beam_search_record()
    (row,) = [r for r in accuracy_rows([record]) if r["selection"] == "naive"]
    assert row["tokens_per_problem"] == record["tokens_generated"] + record["tokens_verified"]
    assert plot_accuracy([record], tmp_path / "acc.png").stat().st_size > 0
