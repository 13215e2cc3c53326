"""Runs spread over Ray workers, on a local Ray instance the tests start themselves: the same
records as one process, a worker killed mid-run, a driver killed mid-run, and bad settings
rejected before any model loads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ttsearch.cli import main
from ttsearch.search import run
from ttsearch.search.config import SearchConfig
from ttsearch.search.results import read_results

# fields that depend on timing or on what else shared the pool, not on the search
VARYING = ("seconds", "peak_kv_blocks", "preemptions")
SETTINGS = dict(strategy="beam_search", n=2, beam_width=2, max_iterations=2, max_tokens=12, max_step_tokens=6)


def searched(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VARYING}


def run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ttsearch.cli", "--log-level", "info", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})


def test_two_workers_write_what_one_process_writes(tiny_checkpoints, tmp_path):
    model = str(tiny_checkpoints["llama3"])
    config = SearchConfig(**SETTINGS)
    alone, spread = tmp_path / "alone.jsonl", tmp_path / "spread.jsonl"
    run(config, alone, model=model, dtype="float32", limit=8, progress=False)
    stats = run(config, spread, model=model, dtype="float32", limit=8, progress=False, workers=2)
    assert {k: stats[k] for k in ("workers", "workers_lost", "requeued")} == {"workers": 2, "workers_lost": [],
                                                                              "requeued": 0}
    one, two = read_results(alone), read_results(spread)
    assert len(two) == len({r["id"] for r in two}) == 8
    assert sorted(map(searched, one), key=lambda r: r["id"]) == sorted(map(searched, two), key=lambda r: r["id"])


def test_a_killed_worker_has_its_problems_requeued(tiny_checkpoints, tmp_path):
    out = tmp_path / "run.jsonl"
    proc = run_cli("run", "--model", str(tiny_checkpoints["llama3"]), "--workers", "2", "--limit", "60",
                   "--dtype", "float32", "--output", str(out), "--strategy", "beam_search", "--n", "4",
                   "--beam-width", "2", "--max-iterations", "4", "--max-tokens", "24", "--max-step-tokens", "8",
                   "--problems-in-flight", "2")
    pids, lines = {}, []
    deadline = time.time() + 180
    while len(pids) < 2 and time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if match := re.search(r"worker (\d+): pid (\d+)", line):
            pids[int(match[1])] = int(match[2])
    assert len(pids) == 2, "".join(lines)
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a worker could be killed"
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    err = "".join(lines) + err
    assert proc.returncode == 0, err[-3000:]
    ids = [r["id"] for r in read_results(out)]
    assert len(ids) == len(set(ids)) == 60
    assert re.search(r"worker 1 died \(\w+\); requeued arith-\d{4}", err), err[-3000:]


def test_a_killed_driver_resumes_with_each_problem_once(tiny_checkpoints, tmp_path):
    out = tmp_path / "run.jsonl"
    args = ["run", "--model", str(tiny_checkpoints["llama3"]), "--workers", "2", "--limit", "40", "--dtype",
            "float32", "--output", str(out), "--strategy", "best_of_n", "--n", "2", "--max-tokens", "12",
            "--problems-in-flight", "2"]
    proc = run_cli(*args)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (out.exists() and out.read_text().count("\n") >= 3):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_results(out)
    proc = run_cli(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    records = read_results(out)
    assert len(records) == len({r["id"] for r in records}) == 40 and records[: len(before)] == before


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "workers=0: expected a positive number of workers"),
    (["--ray-address", "127.0.0.1:9"], "cannot join the Ray cluster at '127.0.0.1:9': nothing answers there"),
])
def test_bad_worker_settings_are_clear_errors(tmp_path, capsys, flags, message):
    # a model that does not exist: the error must come before anything tries to load it
    code = main(["run", "--model", str(tmp_path / "no-model"), "--limit", "1", "--output", str(tmp_path / "o.jsonl"),
                 *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_without_ray_the_flags_say_how_to_install_it(tmp_path):
    blocked = ("import sys, importlib.abc\n"
               "class NoRay(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name == 'ray' or name.startswith('ray.'): raise ImportError('No module named ray')\n"
               "sys.meta_path.insert(0, NoRay())\n"
               "from ttsearch.cli import main\n"
               f"sys.exit(main(['run', '--workers', '2', '--limit', '1', '--output', {str(tmp_path / 'o.jsonl')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'ttsearch[ray]'" in proc.stderr, proc.stderr[-2000:]
    assert "ray" not in subprocess.run([sys.executable, "-c", "import ttsearch.cli, ttsearch.search, sys; "
                                        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"],
                                       capture_output=True, text=True, timeout=120).stdout.strip("[]\n")
