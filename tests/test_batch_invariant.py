"""Batch-invariant mode: a sequence's numbers do not depend on what else shares its batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ttsearch import batch_invariant
from ttsearch.models.llama import Linear
from ttsearch.search.config import SearchConfig
from ttsearch.search.results import read_results


@pytest.fixture
def invariant(monkeypatch):
    monkeypatch.setattr(batch_invariant, "_enabled", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_of_a_matmul_is_the_same_in_any_batch(invariant, dtype):
    gen = torch.Generator().manual_seed(0)
    linear = Linear(torch.randn(320, 576, generator=gen).to(dtype))
    rows = torch.randn(100, 576, generator=gen).to(dtype)
    alone = torch.cat([linear(rows[i : i + 1]) for i in range(len(rows))])
    for batch in (3, 32, 45, 100):
        together = torch.cat([linear(chunk) for chunk in rows.split(batch)])
        assert torch.equal(together, alone), batch


def test_the_mode_follows_engine_cli_and_environment(tiny_checkpoints, monkeypatch):
    import subprocess
    import sys

    from ttsearch.cli import build_parser
    from ttsearch.engine.engine import Engine

    monkeypatch.setattr(batch_invariant, "_enabled", False)
    Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False, batch_invariant=True)
    assert batch_invariant.enabled()
    Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False)  # None keeps it
    assert batch_invariant.enabled()
    with pytest.raises(ValueError, match="batch_invariant must be True, False or None"):
        Engine(str(tiny_checkpoints["llama3"]), batch_invariant="yes")
    assert build_parser().parse_args(["--batch-invariant", "generate"]).batch_invariant
    code = "import ttsearch.batch_invariant as b; print(b.enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TTSEARCH_BATCH_INVARIANT": "1"}).stdout
    assert out.strip() == "True"


def decode_logits(engine, prompt: list[int], others: int) -> tuple[torch.Tensor, object]:
    """The logits after one decode step of a sequence, with ``others`` forks of it (which
    share its prefix) and two unrelated sequences of other lengths in the same batch."""
    seq = engine.add(prompt)
    forks = engine.fork(seq, others) if others else []
    strangers = [engine.add([700 + i] * (9 + 20 * i)) for i in range(2 if others else 0)]
    batch = [*forks[: others // 2], seq, *strangers, *forks[others // 2 :]]
    engine.step(batch)  # greedy: each sequence's token follows its own logits
    tree = engine.runner.last_prefix_tree
    logits = engine.logits(seq).clone()
    for s in batch:
        engine.free(s)
    return logits, tree


@pytest.mark.parametrize("weights", ["dequantized", "packed"])
def test_bf16_logits_are_bitwise_the_same_alone_and_in_any_batch(monkeypatch, weights):
    """SmolLM2 in bfloat16. By default a sequence's logits change in the last bits with its
    batch (this machine's bf16 GEMM blocks by the number of rows, and the forks' shared
    prefix is read once by cascade attention); in batch-invariant mode they do not, with the
    GGUF's weights dequantized or packed (whose products round x to int8 per row)."""
    from ttsearch.engine.engine import Engine

    engine = Engine("smollm2-135m", dtype="bfloat16", kv_cache_bytes=64 << 20, block_size=16, progress=False,
                    weights=weights)
    prompt = list(range(300, 300 + 70))  # 4 full blocks shared with the forks, then a partial one
    _, tree = decode_logits(engine, prompt, 8)
    assert tree.nodes  # the default mode takes the cascade path for the forks
    monkeypatch.setattr(batch_invariant, "_enabled", True)
    alone, tree = decode_logits(engine, prompt, 0)
    for others in (1, 8):
        together, tree = decode_logits(engine, prompt, others)
        assert not tree.nodes and torch.equal(together, alone), others


def test_bf16_records_are_the_same_with_one_or_many_problems_in_flight(invariant, tiny_checkpoints, tmp_path):
    """bfloat16 beam search over 4 problems: one problem at a time (decode batches of 8
    beams, prefixes of one problem only) and all four at once (batches up to 32, the prompt
    shared by every problem) write the same records."""
    from ttsearch.engine.engine import Engine
    from ttsearch.search import run

    # As in test_runs.py's pool tests: the tiny model ends steps at an "e", so beams fork and grow.
    config = SearchConfig(strategy="beam_search", n=8, beam_width=2, max_iterations=3, max_step_tokens=8,
                          max_tokens=12, stop="e", temperature=1.0)
    model = str(tiny_checkpoints["llama3"])
    stats = {}
    for name, in_flight in (("many", 4), ("alone", 1)):
        engine = Engine(model, dtype="bfloat16", kv_cache_bytes=8 << 20, progress=False)
        stats[name] = run(replace(config, problems_in_flight=in_flight), tmp_path / f"{name}.jsonl", policy=engine,
                          limit=4, progress=False)
    many, alone = (read_results(tmp_path / f"{name}.jsonl") for name in ("many", "alone"))
    assert stats["many"].sequences_decoded / stats["many"].decode_steps > 2 * (
        stats["alone"].sequences_decoded / stats["alone"].decode_steps)  # the batches did differ

    def comparable(records):
        return {r["id"]: {k: v for k, v in r.items() if k not in ("seconds", "peak_kv_blocks")} for r in records}

    assert len(many) == 4 and comparable(many) == comparable(alone)
