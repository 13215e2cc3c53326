"""Search on SmolLM2-135M over the first 20 bundled arithmetic problems.

- ``test_strategy[...]``: each strategy with the arithmetic checker: seconds per problem,
  generated and verifier tokens per second, and the peak KV blocks held against the unique
  tokens of the search trees at that moment (U in DESIGN.md: shared prefixes counted once).
- ``test_beam_search_with_prm[...]``: beam search with SmolLM2 as a token-probability PRM
  (Math-Shepherd format), on our engine and written plainly on transformers the way a
  researcher would (one batched ``generate`` per step with a stop string, then every beam's
  full text re-scored by the PRM), same configuration, same run.

    python -m pytest benchmarks/bench_search.py --benchmark-only \
        --benchmark-json benchmarks/results/search_cpu.json
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from ttsearch.engine.engine import Engine
from ttsearch.eval.arithmetic import bundled_arithmetic_path
from ttsearch.eval.datasets import load_jsonl
from ttsearch.eval.grading import extract_answer, is_equivalent
from ttsearch.models.loader import resolve_model_path
from ttsearch.search import SearchConfig
from ttsearch.search.runner import build_prompt, run_jobs
from ttsearch.verifiers import load_verifier

PROBLEMS = 20
SETTINGS = dict(
    n=8, beam_width=4, max_iterations=5, max_step_tokens=40, temperature=0.8, top_p=1.0, problems_in_flight=20,
    system_prompt="Solve the math problem step by step. Write one calculation per step, separate the steps "
    "with a blank line, and end with: The answer is \\boxed{ANSWER}.",
    example_question="What is 12 * 7 + 5?",
    example_solution="12 * 7 = 84\n\n84 + 5 = 89\n\nThe answer is \\boxed{89}.",
)
PRM_TAG = "ки"


@functools.cache
def policy() -> Engine:
    return Engine("smollm2-135m", dtype="bfloat16", kv_cache_bytes=1 << 30, progress=False)


def problems():
    return load_jsonl(bundled_arithmetic_path(), limit=PROBLEMS)


def unique_tokens(seqs) -> int:
    """Distinct prefixes over the live sequences: the nodes of their token trie."""
    trie: dict[tuple[int, int], int] = {}
    for seq in seqs:
        node = 0
        for token in seq.token_ids:
            node = trie.setdefault((node, token), len(trie) + 1)
    return len(trie)


class Meter:
    """Wraps the policy's step writer to follow the KV pool and the trees as they grow."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.peak_blocks = 0
        self.unique_at_peak = 0
        self.beams_at_peak = 0
        self.generated = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step_writer(self, *args, **kwargs):
        writer = self.engine.step_writer(*args, **kwargs)
        advance = writer.advance

        def metered_advance():
            ended = advance()
            self.generated += sum(len(result.token_ids) for _, result in ended)
            used = self.engine.blocks.num_used
            if used > self.peak_blocks:
                live = list(self.engine._live.values())
                self.peak_blocks, self.unique_at_peak, self.beams_at_peak = used, unique_tokens(live), len(live)
            return ended

        writer.advance = metered_advance
        return writer


def run_ours(config: SearchConfig, verifier) -> tuple[list[dict], Meter]:
    meter = Meter(policy())
    records: list[dict] = []
    run_jobs(problems(), meter, verifier, config, on_record=records.append, progress=False)
    return records, meter


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search", "dvts"])
def test_strategy(benchmark, strategy):
    config = SearchConfig(strategy=strategy, **SETTINGS)
    verifier = load_verifier("arithmetic")
    out = {}
    start = time.perf_counter()
    out["records"], out["meter"] = benchmark.pedantic(run_ours, args=(config, verifier), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    records, meter = out["records"], out["meter"]
    block_tokens = meter.peak_blocks * policy().block_size
    benchmark.extra_info.update(
        {
            "problems": len(records),
            "seconds_per_problem": seconds / len(records),
            "generated_tokens_per_s": meter.generated / seconds,
            "accuracy_naive_at_n": sum(r["selections"]["naive"][str(config.n)]["correct"] for r in records) / len(records),
            "peak_kv_blocks": meter.peak_blocks,
            "peak_kv_block_tokens": block_tokens,
            "unique_tokens_at_peak": meter.unique_at_peak,
            "live_sequences_at_peak": meter.beams_at_peak,
            "kv_tokens_over_unique": block_tokens / max(meter.unique_at_peak, 1),
        }
    )


# ----------------------------------------------------------------------------- against transformers


@functools.cache
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    return model, tok


def plain_beam_search(question: str, config: SearchConfig, seed: int) -> tuple[str, int, int]:
    """Beam search the way a script on transformers does it: text in, text out, every
    iteration re-encodes each beam's full text for the policy and for the PRM."""
    model, tok = hf_model()
    tok.padding_side = "left"
    prompt = tok.decode(build_prompt(tok, question, config))
    tag_id = tok.encode(PRM_TAG, add_special_tokens=False)[-1]
    good, bad = tok.encode("+ -", add_special_tokens=False)  # as the Math-Shepherd card looks them up
    torch.manual_seed(seed)
    beams: list[list[str]] = [[] for _ in range(config.n)]
    finished: list[tuple[float, str]] = []
    generated = verified = 0
    for _ in range(config.max_iterations):
        texts = [prompt + "".join(steps) for steps in beams]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=config.max_step_tokens, do_sample=True, temperature=config.temperature,
                top_p=config.top_p, stop_strings=[config.stop], tokenizer=tok, pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        steps, ended = [], []
        for row in new:
            ids = row.tolist()
            # finished rows are padded with pad_token_id, which for SmolLM2 is EOS itself: a
            # row ended by the stop string must not count as an answer that ended at EOS
            end = ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids)
            text = tok.decode(ids[:end], skip_special_tokens=True)
            if config.stop in text:
                text = text[: text.index(config.stop) + len(config.stop)]
                eos = False
            else:
                eos = end < len(ids)
            generated += end + eos
            steps.append(text)
            ended.append(eos)
        beams = [b + [s] for b, s in zip(beams, steps)]
        # the PRM re-reads every beam's whole text, a tag after each step, full logits
        prm_texts = [question + " " + "".join(s.rstrip() + f" {PRM_TAG}" + (s[len(s.rstrip()):] or "\n") for s in b)
                     for b in beams]
        enc = tok(prm_texts, return_tensors="pt", padding=True, add_special_tokens=False)
        verified += int(enc["attention_mask"].sum())
        with torch.no_grad():
            logits = model(**enc).logits.float()
        scores = []
        for row, mask, ids in zip(logits, enc["attention_mask"], enc["input_ids"]):
            last_tag = (ids == tag_id).nonzero()[-1].item()
            pair = row[last_tag, [good, bad]].softmax(-1)
            scores.append(pair[0].item())
        ranked = sorted(range(len(beams)), key=lambda i: -scores[i])
        live = []
        for i in ranked:
            if ended[i]:
                finished.append((scores[i], "".join(beams[i])))
            else:
                live.append(i)
        if len(finished) >= config.n or not live:
            break
        keep = live[: config.n // config.beam_width]
        beams = [list(beams[i]) for i in keep for _ in range(config.beam_width)]
    best = max(finished)[1] if finished else ""
    return best, generated, verified


def test_beam_search_with_prm(benchmark):
    config = SearchConfig(strategy="beam_search", **SETTINGS)
    engine = policy()
    prm = load_verifier("smollm2-135m", policy_engine=engine, family="math-shepherd", tag=PRM_TAG)
    start = time.perf_counter()
    forwarded_before = engine.stats()["tokens_forwarded"]
    records, meter = run_ours(config, prm)
    ours = time.perf_counter() - start
    ours_forwarded = engine.stats()["tokens_forwarded"] - forwarded_before

    def plain():
        totals = [0, 0, 0]
        for i, problem in enumerate(problems()):
            answer_text, generated, verified = plain_beam_search(problem.question, config, seed=i)
            totals[0] += is_equivalent(extract_answer(answer_text) or "", problem.answer)
            totals[1] += generated
            totals[2] += verified
        return totals

    hf_model()  # loading is not part of the search
    start = time.perf_counter()
    correct, generated, verified = benchmark.pedantic(plain, rounds=1, iterations=1)
    theirs = time.perf_counter() - start
    benchmark.extra_info.update(
        {
            "problems": PROBLEMS,
            "ours_seconds_per_problem": ours / PROBLEMS,
            "plain_transformers_seconds_per_problem": theirs / PROBLEMS,
            "speedup": theirs / ours,
            "ours_generated_tokens": meter.generated,
            "ours_tokens_forwarded_policy_and_prm": ours_forwarded,
            "plain_generated_tokens": generated,
            "plain_prm_tokens_forwarded": verified,
            "ours_accuracy_naive": sum(r["selections"]["naive"][str(config.n)]["correct"] for r in records) / PROBLEMS,
            "plain_accuracy": correct / PROBLEMS,
        }
    )
