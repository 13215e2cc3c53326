"""The research workflow end to end on a tiny real checkpoint: the CLI, resume after
SIGKILL, eval and plot, and settings rejected before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttsearch.cli import main
from ttsearch.search.results import read_results
from ttsearch.search.runner import build_prompt
from ttsearch.search.config import SearchConfig

FAST = ["--max-iterations", "2", "--max-step-tokens", "6", "--problems-in-flight", "1", "--dtype", "float32"]


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
    assert "best_of_n n=4" in table and "weighted" in table
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
    for label in ("best-of-N", "beam search", "DVTS"):
        (row,) = [line for line in out.splitlines() if line.strip().startswith(label)]
        assert len(row.split()[-3:]) == 3 and all(0 <= float(x) <= 1 for x in row.split()[-3:])
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    for name in ("best_of_n", "beam_search", "dvts"):
        records = read_results(tmp_path / f"{name}.jsonl")
        assert [r["n"] for r in records] == [4, 4] and all(r["strategy"] == name for r in records)


def test_a_small_kv_pool_admits_fewer_problems_at_once_instead_of_failing(tiny_checkpoints, tmp_path):
    from ttsearch.engine.engine import Engine
    from ttsearch.search import run

    model = str(tiny_checkpoints["llama3"])
    block_bytes = Engine(model, dtype="float32", kv_cache_bytes=1 << 20, progress=False).block_bytes
    config = SearchConfig(strategy="beam_search", n=4, beam_width=2, max_iterations=3, max_step_tokens=8,
                          temperature=1.0, problems_in_flight=8)
    # 40 blocks: room for two or three of these problems at once, not eight
    out = run(config, tmp_path / "run.jsonl", model=model, dtype="float32", limit=8,
              kv_cache_bytes=40 * block_bytes, progress=False)
    records = read_results(out)
    assert sorted(r["id"] for r in records) == [f"arith-{i:04d}" for i in range(8)]
    assert max(r["peak_kv_blocks"] for r in records) <= 40
