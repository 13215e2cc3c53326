"""Verifier cost on a beam-search-shaped tree: incremental scoring on the KV tree against full
re-scoring of every beam's whole text (what a text-driven search does each iteration), with
the same PRM in the same run.

SmolLM2-135M serves as a token-probability PRM in the Math-Shepherd format with the tag
``TAG``. The tree: a 200-token prompt, 16 beams, 10 steps of about 40 tokens; after each
step the first 4 beams survive and fork 4 ways (a fixed shape, so both modes score the same
tree). Reported in extra_info: verifier tokens forwarded and seconds, and with the second
mode the ratios full / incremental. Each dtype is one run of both modes.

    python -m pytest benchmarks/bench_verifiers.py --benchmark-only \
        --benchmark-json benchmarks/results/verifiers_cpu.json
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from ttsearch import ops
from ttsearch.verifiers import ModelPRM, load_verifier

TAG = "ки"
BEAMS, KEEP, STEPS = 16, 4, 10
PROMPT_TOKENS, STEP_TOKENS = 200, 40
DTYPES = ("float32", "bfloat16")
RESULTS: dict[tuple[str, str], dict] = {}


@functools.cache
def verifier(dtype: str) -> ModelPRM:
    return load_verifier(
        "smollm2-135m", family="math-shepherd", tag=TAG, dtype=dtype, kv_cache_bytes=1 << 30, progress=False
    )


def sentence(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    verb, result = rng.choice([("multiply", a * b), ("add", a + b), ("subtract", a - b)])
    return f"We {verb} {a} and {b}, which gives {result} for the next part. "


def text_of(rng: random.Random, tokenizer, tokens: int) -> str:
    """About ``tokens`` tokens of arithmetic prose, cut at a word."""
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:
        text += sentence(rng)
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids).rsplit(" ", 1)[0]


@functools.cache
def workload() -> tuple[str, list[list[str]]]:
    """The question and ``steps[t][b]``, the step beam b writes at iteration t."""
    rng, tokenizer = random.Random(0), verifier(DTYPES[0]).engine.tokenizer
    question = text_of(rng, tokenizer, PROMPT_TOKENS)
    steps = [[text_of(rng, tokenizer, STEP_TOKENS) + "\n\n" for _ in range(BEAMS)] for _ in range(STEPS)]
    return question, steps


def incremental(v: ModelPRM, question: str, steps: list[list[str]]) -> None:
    root = v.new(question)
    beams = v.fork(root, BEAMS)
    v.free(root)
    for t in range(STEPS):
        v.score(beams, steps[t])
        if t == STEPS - 1:
            break
        survivors = beams[:KEEP]
        for beam in beams[KEEP:]:
            v.free(beam)
        beams = [child for beam in survivors for child in v.fork(beam, BEAMS // KEEP)]
        for beam in survivors:
            v.free(beam)
    for beam in beams:
        v.free(beam)


def rescore(v: ModelPRM, question: str, histories: list[list[str]]) -> torch.Tensor:
    """Every step of every beam's whole text, forwarded from scratch in one batch."""
    engine = v.engine
    written = [v.token_ids(question, steps) for steps in histories]
    # one token through add, the rest appended: add would reuse cached blocks, and this
    # mode forwards the whole text as a text-driven search does
    seqs = [engine.add(ids[:1], logits=False) for ids, _ in written]
    hidden = engine.append_batch(
        seqs, [ids[1:] for ids, _ in written], hidden_at=[[r - 1 for r in reads] for _, reads in written],
        logits=False,
    )
    for seq in seqs:
        engine.free(seq)
    n = hidden.shape[0]
    scores, _ = v.readout(hidden, torch.zeros(n), torch.zeros(n, dtype=torch.int64), "last")
    return scores


def full(v: ModelPRM, question: str, steps: list[list[str]]) -> None:
    histories: list[list[str]] = [[] for _ in range(BEAMS)]
    for t in range(STEPS):
        histories = [history + [steps[t][b]] for b, history in enumerate(histories)]
        rescore(v, question, histories)
        histories = [list(h) for h in histories[:KEEP] for _ in range(BEAMS // KEEP)]


@pytest.mark.parametrize("mode", ["incremental", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_verifier_tree(benchmark, dtype, mode):
    v = verifier(dtype)
    question, steps = workload()
    before = v.engine.stats()["tokens_forwarded"]
    benchmark.pedantic({"incremental": incremental, "full": full}[mode], args=(v, question, steps), rounds=1)
    forwarded = v.engine.stats()["tokens_forwarded"] - before
    assert v.engine.stats()["blocks_used"] == 0
    RESULTS[dtype, mode] = {"tokens_forwarded": forwarded, "seconds": benchmark.stats["mean"]}
    step_tokens = [len(v.engine.tokenizer.encode(s, add_special_tokens=False)) for row in steps for s in row]
    benchmark.extra_info.update(
        {
            "mode": mode,
            "model": "smollm2-135m",
            "dtype": dtype,
            "ops": ops.IMPLEMENTATIONS[v.engine.device.type],
            "beams": BEAMS,
            "keep": KEEP,
            "steps": STEPS,
            "prompt_tokens": len(v.token_ids(question, [])[0]),
            "step_tokens_mean": sum(step_tokens) / len(step_tokens),
            **RESULTS[dtype, mode],
        }
    )
    if mode == "full" and (dtype, "incremental") in RESULTS:
        inc = RESULTS[dtype, "incremental"]
        benchmark.extra_info["tokens_ratio_full_over_incremental"] = forwarded / inc["tokens_forwarded"]
        benchmark.extra_info["seconds_ratio_full_over_incremental"] = benchmark.stats["mean"] / inc["seconds"]
