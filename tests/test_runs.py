"""The research workflow end to end on a tiny real checkpoint: the CLI, resume after
SIGKILL, eval and plot, and settings rejected before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from ttsearch.cli import main
from ttsearch.search.results import read_results
from ttsearch.search.runner import build_prompt
from ttsearch.search.config import SearchConfig

FAST = ["--max-iterations", "2", "--max-tokens", "12", "--max-step-tokens", "6", "--problems-in-flight", "1",
        "--dtype", "float32"]


def run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ttsearch.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "TQDM_DISABLE": "1"})


def test_killed_run_resumes_without_losing_or_repeating_a_problem(tiny_checkpoints, tmp_path):
    out = tmp_path / "run.jsonl"
    args = ["run", "--model", str(tiny_checkpoints["llama3"]), "--strategy", "best_of_n", "--n", "2",
            "--limit", "40", "--output", str(out), *FAST]
    proc = run_cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = out.read_bytes()
    lines_before = kept.count(b"\n")
    with out.open("ab") as f:  # what a kill in the middle of a write would leave
        f.write(b'{"id": "arith-00')

    proc = run_cli(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    data = out.read_bytes()
    assert data.startswith(kept[: kept.rfind(b"\n") + 1]), "finished lines changed"
    records = read_results(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 40 and lines_before >= 3
    assert all(line.startswith(b"{") for line in data.splitlines())


def test_eval_and_plot(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "bon.jsonl"
    assert main(["run", "--model", str(tiny_checkpoints["llama3"]), "--strategy", "best_of_n", "--n", "4",
                 "--limit", "3", "--output", str(out), *FAST]) == 0
    records = read_results(out)
    assert len(records) == 3 and set(records[0]["selections"]) == {"naive", "majority", "weighted"}
    assert set(records[0]["selections"]["naive"]) == {"1", "2", "4"}
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    table = capsys.readouterr().out
    assert "best_of_n" in table and "weighted" in table and "tokens/problem" in table
    png = tmp_path / "acc.png"
    assert main(["plot", str(out), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "beam_search", "--n", "6", "--beam-width", "4"], "n=6 is not a multiple of beam_width=4"),
        (["--strategy", "annealing"], "strategy='annealing'"),
        (["--dataset", "DATASET", "--fields", '{"question": "prompt", "answer": "target"}'], "target"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(tmp_path, capsys, flags, message):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"prompt": "1 + 1?", "solution": "2"}) + "\n")
    flags = [str(dataset) if f == "DATASET" else f for f in flags]
    code = main(["run", "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "o.jsonl"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "no-such-model" not in err  # failed before trying to load the model


def test_prompt_does_not_depend_on_todays_date(tiny_checkpoints):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoints["llama3"])
    tok.chat_template = (
        "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "Today Date: {{ date_string }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    )
    text = tok.decode(build_prompt(tok, "What is 2 + 2?", SearchConfig()))
    assert "Today Date: 26 Jul 2024" in text and time.strftime("%d %b %Y") not in text


def test_demo_prints_its_table_and_writes_the_plot(tmp_path, capsys):
    """The README's main command on two problems at N=4: SmolLM2 and the arithmetic checker."""
    assert main(["demo", "--output-dir", str(tmp_path), "--limit", "2", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "one sample (N=1)" in out and "mean over all" in out
    # each strategy's accuracy as it finishes, in order, before the table
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split("] ")[1].split(":")[0] for line in progress] == ["best-of-N", "beam search", "DVTS"]
    assert "one sample" in progress[0] and all("N=4 best score" in line for line in progress)
    assert out.index(progress[-1]) < out.index("accuracy on 2 problems")
    for label in ("best-of-N", "beam search", "DVTS"):
        (row,) = [line for line in out.splitlines() if line.strip().startswith(label)]
        assert len(row.split()[-3:]) == 3 and all(0 <= float(x) <= 1 for x in row.split()[-3:])
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    for name in ("best_of_n", "beam_search", "dvts"):
        records = read_results(tmp_path / f"{name}.jsonl")
        assert [r["n"] for r in records] == [4, 4] and all(r["strategy"] == name for r in records)


# ----------------------------------------------------------------------------- a full KV pool

# The tiny random model writes "e" often and "\n\n" almost never: steps end at an "e", so
# beams live for several iterations, fork, and grow.
POOL_CONFIG = dict(strategy="beam_search", n=8, beam_width=2, max_iterations=5, max_step_tokens=12, max_tokens=24,
                   stop="e", temperature=1.0, problems_in_flight=6)
TIMING = ("seconds", "peak_kv_blocks", "preemptions")


def comparable(records: list[dict]) -> dict:
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMING} for r in records}


def test_a_pool_too_small_for_all_problems_preempts_and_writes_the_same_records(tiny_checkpoints, tmp_path):
    from ttsearch.engine.engine import Engine
    from ttsearch.search import run

    model = str(tiny_checkpoints["llama3"])
    config = SearchConfig(**POOL_CONFIG)
    large = Engine(model, dtype="float32", kv_cache_bytes=8 << 20, progress=False)
    run(config, tmp_path / "large.jsonl", policy=large, limit=6, progress=False)
    expected = read_results(tmp_path / "large.jsonl")
    alone = Engine(model, dtype="float32", kv_cache_bytes=8 << 20, progress=False)
    run(replace(config, problems_in_flight=1), tmp_path / "alone.jsonl", policy=alone, limit=6, progress=False)
    one_at_a_time = max(r["peak_kv_blocks"] for r in read_results(tmp_path / "alone.jsonl"))
    assert max(r["peak_kv_blocks"] for r in expected) > 2 * one_at_a_time  # the large pool held many at once

    # room for one problem and a half: two start, and grow until one must give way
    small = Engine(model, dtype="float32", kv_cache_bytes=int(1.5 * one_at_a_time) * large.block_bytes, progress=False)
    stats = run(config, tmp_path / "small.jsonl", policy=small, limit=6, progress=False)
    got = read_results(tmp_path / "small.jsonl")
    assert stats.preemptions > 0 and sum(r["preemptions"] for r in got) == stats.preemptions == stats.restores
    assert comparable(got) == comparable(expected) == comparable(read_results(tmp_path / "alone.jsonl"))
    for engine in (large, alone, small):
        assert engine.stats()["blocks_used"] == 0 and engine.stats()["sequences"] == 0


def test_a_problem_that_cannot_fit_even_alone_fails_before_its_first_token(tiny_checkpoints, tmp_path):
    from ttsearch.engine.engine import Engine
    from ttsearch.errors import KVCacheFullError
    from ttsearch.search import run

    policy = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", progress=False)
    policy = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=6 * policy.block_bytes,
                    progress=False)
    config = SearchConfig(**{**POOL_CONFIG, "n": 8})
    with pytest.raises(KVCacheFullError) as info:
        run(config, tmp_path / "out.jsonl", policy=policy, limit=3, progress=False)
    message = str(info.value)
    assert "problem 'arith-0000' cannot fit in the policy's KV pool even alone: n=8 beams on a" in message
    assert "the pool holds 96 tokens" in message and "--kv-cache-gib" in message
    assert policy.tokens_forwarded == 0 and policy.stats()["blocks_used"] == 0
    assert read_results(tmp_path / "out.jsonl") == []


# ----------------------------------------------------------------------------- recipes, budgets, resume


def test_a_search_and_learn_recipe_runs(tiny_checkpoints, tmp_path, capsys):
    recipe = tmp_path / "beam_search.yaml"
    recipe.write_text("# refer to src/sal/config.py for more options\n"
                      "filter_duplicates: true\napproach: beam_search\nn: 4\nbeam_width: 2\nnum_iterations: 2\n"
                      "max_tokens: 12\nagg_strategy: min\nsearch_batch_size: 1  # DO NOT CHANGE!\n"
                      "prm_batch_size: 4\nnum_samples: 2\nseed: 0\n")
    out = tmp_path / "run.jsonl"
    with pytest.warns(UserWarning, match="ignored, no meaning in ttsearch: search_batch_size .*; prm_batch_size"):
        code = main(["run", "--model", str(tiny_checkpoints["llama3"]), "--config", str(recipe), "--output", str(out),
                     "--dtype", "float32", "--max-step-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    records = read_results(out)
    assert [r["id"] for r in records] == ["arith-0000", "arith-0001"]
    assert all(r["strategy"] == "beam_search" and r["rules"]["filter_duplicates"] for r in records)
    assert records[0]["settings"]["aggregation"] == "min" and records[0]["settings"]["max_iterations"] == 2


def test_a_bad_recipe_key_fails_before_any_model_loads(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("approach: beam_search\nbeam_widht: 4\n")
    code = main(["run", "--model", str(tmp_path / "no-such-model"), "--config", str(recipe),
                 "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown setting 'beam_widht'" in err and "no-such-model" not in err


def test_one_run_searches_every_budget_and_resumes_only_with_its_settings(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "beam.jsonl"
    args = ["run", "--model", str(tiny_checkpoints["llama3"]), "--strategy", "beam_search", "--beam-width", "2",
            "--limit", "2", "--output", str(out), *FAST]
    assert main([*args, "--n", "2,4"]) == 0
    records = read_results(out)
    assert sorted((r["id"], r["n"]) for r in records) == [(f"arith-000{i}", n) for i in range(2) for n in (2, 4)]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [row[3] for row in rows if row[:3] == ["beam_search", "M=2", "naive"]] == ["2", "4"]  # one row per budget, each from its own search
    assert main([*args, "--n", "2,4,8"]) == 0  # resumes: only the new budget runs
    assert sorted(r["n"] for r in read_results(out)) == [2, 2, 4, 4, 8, 8]
    capsys.readouterr()
    assert main([*args, "--n", "2", "--temperature", "0.5", "--top-p", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "written with other settings (temperature: 0.8 in the file, 0.5 now; top_p: 1.0 in the file, 0.9 now)" in err
    assert len(read_results(out)) == 6


def test_admission_and_preemption_count_a_separate_verifier_pool(tiny_checkpoints, tmp_path):
    """A PRM on its own engine: its pool bounds the problems in flight as the policy's does."""
    from ttsearch.engine.engine import Engine
    from ttsearch.errors import KVCacheFullError
    from ttsearch.search import run
    from ttsearch.verifiers import load_verifier

    model, prm_model = str(tiny_checkpoints["llama3"]), str(tiny_checkpoints["mistral"])
    config = SearchConfig(**{**POOL_CONFIG, "n": 4})

    def prm(blocks):  # the tiny tokenizer spells "+ -" in three tokens: other candidates
        return load_verifier(prm_model, policy_engine=policy, family="math-shepherd", tag="e", good="a", bad="b",
                             dtype="float32", kv_cache_bytes=blocks * 4096, progress=False)

    policy = Engine(model, dtype="float32", kv_cache_bytes=8 << 20, progress=False)
    verifier = prm(1024)
    run(config, tmp_path / "large.jsonl", policy=policy, verifier=verifier, limit=3, progress=False)
    one = min(r["peak_kv_blocks"] for r in read_results(tmp_path / "large.jsonl"))
    assert verifier.engine is not policy and verifier.engine.stats()["blocks_used"] == 0

    small = prm(30)  # a few problems' PRM prompts, not all three with their steps
    stats = run(config, tmp_path / "small.jsonl", policy=policy, verifier=small, limit=3, progress=False)
    assert comparable(read_results(tmp_path / "small.jsonl")) == comparable(read_results(tmp_path / "large.jsonl"))
    assert small.engine.stats()["blocks_used"] == 0 and policy.stats()["blocks_used"] == 0
    assert stats.decode_steps > 0 and one > 0

    with pytest.raises(KVCacheFullError, match="cannot fit in the verifier's KV pool even alone: n=4 beams"):
        run(config, tmp_path / "tiny.jsonl", policy=policy, verifier=prm(4), limit=3, progress=False)
    assert read_results(tmp_path / "tiny.jsonl") == []
