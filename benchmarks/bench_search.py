"""Search on SmolLM2-135M over the first bundled arithmetic problems, n=16, M=4.

- ``test_strategy[...]``: each strategy with the arithmetic checker, every problem in flight:
  seconds and tokens (generated, verified) per problem, decode batch occupancy (sequences
  decoded over live beams, per token), the share of wall time spent scoring, and the peak
  KV blocks held against the unique tokens of the search trees at that moment (U, each shared
  token counted once).
- ``test_beam_search_with_prm``: beam search with SmolLM2 as a Math-Shepherd-format PRM, ours
  with every problem in flight and with one in flight, against search-and-learn's beam search
  written plainly on transformers with its batching: one problem at a time, its n beams in
  one ``generate`` per step, the PRM re-reading every path whole every iteration in batches
  of ``prm_batch_size``. Both sides follow the same rules (refill
  to n, the last iteration to EOS, completions at EOS / a length cut / an empty step, the n
  best completions), the same prompt, PRM format and settings, so their tokens per problem
  should agree within sampling noise; both are reported beside the time. Ours also reports
  the seconds its weight products took (timed in the run): no scheduling or attention work
  can take our time below them.
- ``test_beam_search_with_prm_weights[dequantized|packed]``: ours, every problem in flight,
  on SmolLM2's Q4_1 file dequantized to bf16 at load against kept in its quantized blocks.
- ``test_beam_search_with_prm_more_problems_in_flight[24|48]``: ours alone with more
  problems, all in flight, to see how time per problem scales with the batch.

    python -m pytest benchmarks/bench_search.py --benchmark-only \
        --benchmark-json benchmarks/results/search_cpu_<machine>.json
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field, replace

import pytest
import torch

from ceilings import model_gemm_flops
from ttsearch.engine.engine import Engine
from ttsearch.eval.arithmetic import bundled_arithmetic_path
from ttsearch.eval.datasets import load_jsonl
from ttsearch.eval.grading import extract_answer, is_equivalent
from ttsearch.models.llama import Linear
from ttsearch.models.loader import resolve_model_path
from ttsearch.search import SearchConfig
from ttsearch.search.runner import build_prompt, run_jobs
from ttsearch.verifiers import load_verifier

PROBLEMS = 12
PRM_BATCH_SIZE = 4  # search-and-learn's default
SETTINGS = dict(
    n=16, beam_width=4, max_iterations=6, max_step_tokens=64, max_tokens=128, temperature=0.8, top_p=1.0,
    aggregation="last", problems_in_flight=PROBLEMS,
    system_prompt="Solve the math problem step by step. Write one calculation per step, separate the steps "
    "with a blank line, and end with: The answer is \\boxed{ANSWER}.",
    example_question="What is 12 * 7 + 5?",
    example_solution="12 * 7 = 84\n\n84 + 5 = 89\n\nThe answer is \\boxed{89}.",
)
PRM_TAG = "ки"


@functools.cache
def policy(weights: str = "dequantized") -> Engine:
    return Engine("smollm2-135m", weights=weights, kv_cache_bytes=1 << 30, progress=False)


def problems(count: int = PROBLEMS):
    return load_jsonl(bundled_arithmetic_path(), limit=count)


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

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step_writer(self, *args, **kwargs):
        writer = self.engine.step_writer(*args, **kwargs)
        advance = writer.advance

        def metered_advance():
            ended = advance()
            used = self.engine.blocks.num_used
            if used > self.peak_blocks:
                live = list(self.engine._live.values())
                self.peak_blocks, self.unique_at_peak, self.beams_at_peak = used, unique_tokens(live), len(live)
            return ended

        writer.advance = metered_advance
        return writer


@contextlib.contextmanager
def gemm_timer():
    """Times every weight product of the model (policy and PRM alike) while the block runs:
    the part of a search that no scheduling or attention kernel can remove."""
    seconds = [0.0]
    matmul = Linear._matmul

    def timed(self, x):
        start = time.perf_counter()
        out = matmul(self, x)
        seconds[0] += time.perf_counter() - start
        return out

    Linear._matmul = timed
    try:
        yield seconds
    finally:
        Linear._matmul = matmul


def run_ours(config: SearchConfig, verifier, count: int = PROBLEMS, engine: Engine | None = None) -> dict:
    """One search over the first ``count`` problems on ``engine`` (default: the CPU policy)."""
    engine = policy() if engine is None else engine
    meter = Meter(engine)
    records: list[dict] = []
    with gemm_timer() as gemm_seconds:
        start = time.perf_counter()
        stats = run_jobs([(p, config) for p in problems(count)], meter, verifier, on_record=records.append,
                         progress=False)
        seconds = time.perf_counter() - start
    block_tokens = meter.peak_blocks * engine.block_size
    return {
        "seconds_per_problem": seconds / len(records),
        "generated_tokens_per_problem": sum(r["tokens_generated"] for r in records) / len(records),
        "generated_tokens_by_problem": {r["id"]: r["tokens_generated"] for r in sorted(records, key=lambda r: r["id"])},
        "verified_tokens_per_problem": sum(r["tokens_verified"] for r in records) / len(records),
        "accuracy_naive_at_n": sum(r["selections"]["naive"][str(config.n)]["correct"] for r in records) / len(records),
        "decode_batch_occupancy": stats.occupancy,
        "mean_decode_batch": stats.sequences_decoded / max(stats.decode_steps, 1),
        "scoring_share_of_wall_time": stats.score_seconds / seconds,
        "gemm_seconds_per_problem": gemm_seconds[0] / len(records),
        "gemm_share_of_wall_time": gemm_seconds[0] / seconds,
        "preemptions": stats.preemptions,
        "peak_kv_block_tokens": block_tokens,
        "unique_tokens_at_peak": meter.unique_at_peak,
        "live_sequences_at_peak": meter.beams_at_peak,
        "kv_tokens_over_unique": block_tokens / max(meter.unique_at_peak, 1),
    }


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search", "dvts"])
def test_strategy(benchmark, strategy):
    config = SearchConfig(strategy=strategy, **SETTINGS)
    result = benchmark.pedantic(run_ours, args=(config, load_verifier("arithmetic")), rounds=1, iterations=1)
    benchmark.extra_info.update({"problems": PROBLEMS, "dtype": str(policy().dtype), **result})


# ----------------------------------------------------------------------------- against transformers


@functools.cache
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=policy().dtype).eval()
    return model, tok


@dataclass
class PlainBeam:
    steps: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the tokens its steps sampled
    score: float = 0.0
    completed: bool = False


def plain_beam_search(question: str, config: SearchConfig, prm, seed: int) -> tuple[str, int, int, int]:
    """search-and-learn's ``_beam_search`` for one problem, on transformers: every iteration
    prefills each beam's whole path again for the policy and for the PRM. A path continues
    from the tokens it sampled, as ours does: re-encoding its text would change them (a step
    ending in a sampled "\n", "\n" re-encodes as the single "\n\n" token, after which
    SmolLM2 writes different, longer steps), and the two sides would not do the same work.
    Returns the answer text (the best completion), generated tokens, PRM tokens and the
    prompt tokens each ``generate`` prefilled again."""
    model, tok = hf_model()
    prompt = build_prompt(tok, question, config)
    good, bad = prm.format.candidates
    torch.manual_seed(seed)
    beams = [PlainBeam() for _ in range(config.n)]
    completed: list[PlainBeam] = []
    generated = verified = prefilled = 0
    for i in range(config.max_iterations):
        active = [b for b in beams if not b.completed]
        if len(active) != config.n:  # duplicate the survivors to refill n, in their order
            active = [copy.deepcopy(b) for b in (active * (config.n // len(active) + 1))[: config.n]]
        last = i == config.max_iterations - 1  # the last iteration writes to EOS
        enc = tok.pad({"input_ids": [prompt + b.ids for b in active]}, padding_side="left", return_tensors="pt")
        prefilled += int(enc["attention_mask"].sum())
        with torch.no_grad():
            # top_k=0: off, as in vLLM and ours; transformers would otherwise keep only the top 50
            out = model.generate(
                **enc, do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                max_new_tokens=config.max_tokens if last else config.step_tokens,
                stop_strings=None if last else [config.stop], tokenizer=tok, pad_token_id=tok.pad_token_id,
            )
        for beam, row in zip(active, out[:, enc["input_ids"].shape[1]:]):
            ids = row.tolist()
            # rows that ended are padded with pad_token_id, which for SmolLM2 is EOS itself:
            # a row ended by the stop string is not an answer that ended at EOS
            end = ids.index(tok.eos_token_id) if tok.eos_token_id in ids else len(ids)
            text = tok.decode(ids[:end], skip_special_tokens=True)  # the whole last token, as ours keeps it
            stopped = not last and config.stop in text
            generated += end + (not stopped and end < len(ids))  # an EOS that ended the row is generated too
            beam.steps.append(text)
            beam.ids += ids[:end]
            beam.completed = not stopped or not text  # EOS, a length cut, or an empty step
        # the PRM re-reads every beam's whole path, a tag after each step, full logits, in batches
        paths = [prm.token_ids(question, b.steps) for b in active]
        for start in range(0, len(paths), PRM_BATCH_SIZE):
            batch = paths[start:start + PRM_BATCH_SIZE]
            enc = tok.pad({"input_ids": [ids for ids, _ in batch]}, padding_side="right", return_tensors="pt")
            verified += int(enc["attention_mask"].sum())
            with torch.no_grad():
                logits = model(**enc).logits.float()
            for beam, row, (_, reads) in zip(active[start:start + PRM_BATCH_SIZE], logits, batch):
                beam.score = row[reads[-1], [good, bad]].softmax(-1)[0].item()
        completed += [b for b in active if b.completed]
        open_ = [b for b in active if not b.completed]
        if not open_:
            break
        keep = set(map(id, sorted(open_, key=lambda b: -b.score)[: config.n // config.beam_width]))
        beams = [b for b in open_ if id(b) in keep]
    answers = sorted(completed, key=lambda b: -b.score)[: config.n]
    return ("".join(answers[0].steps) if answers else ""), generated, verified, prefilled


def test_beam_search_with_prm(benchmark):
    config = SearchConfig(strategy="beam_search", **SETTINGS)
    engine = policy()
    prm = load_verifier("smollm2-135m", policy_engine=engine, family="math-shepherd", tag=PRM_TAG)
    all_in_flight = run_ours(config, prm)
    one_in_flight = run_ours(replace(config, problems_in_flight=1), prm)

    plain_generated = {}

    def plain():
        totals = [0, 0, 0, 0]
        for i, problem in enumerate(problems()):
            answer_text, generated, verified, prefilled = plain_beam_search(problem.question, config, prm, seed=i)
            plain_generated[problem.id] = generated
            totals[0] += is_equivalent(extract_answer(answer_text) or "", problem.answer)
            totals[1] += generated
            totals[2] += verified
            totals[3] += prefilled
        return totals

    hf_model()  # loading is not part of the search
    correct, generated, verified, prefilled = benchmark.pedantic(plain, rounds=1, iterations=1)
    theirs = benchmark.stats["mean"] / PROBLEMS
    # The least time our work can take at this machine's GEMM rate, at the batches it ran:
    # every generated token costs the whole model's products at the mean decode batch,
    # every verified one all but the LM head's at 256 rows (scoring forwards are larger).
    model = engine.model
    per_token = model.matmul_flops_per_token()
    per_verified = per_token - 2 * model.config.hidden_size * model.config.vocab_size
    decode_rows = max(1, round(all_in_flight["mean_decode_batch"]))
    decode_ceiling, scoring_ceiling = model_gemm_flops(model, decode_rows), model_gemm_flops(model, 256)
    at_ceiling = (all_in_flight["generated_tokens_per_problem"] * per_token / decode_ceiling
                  + all_in_flight["verified_tokens_per_problem"] * per_verified / scoring_ceiling)
    benchmark.extra_info.update(
        {
            "problems": PROBLEMS,
            "dtype": str(engine.dtype),
            "plain_transformers_seconds_per_problem": theirs,
            "plain_generated_tokens_per_problem": generated / PROBLEMS,
            "plain_generated_tokens_by_problem": plain_generated,
            "plain_prm_tokens_per_problem": verified / PROBLEMS,
            "plain_prefilled_tokens_per_problem": prefilled / PROBLEMS,
            "plain_accuracy": correct / PROBLEMS,
            "decode_gemm_ceiling_gflops": decode_ceiling / 1e9,
            "decode_gemm_ceiling_rows": decode_rows,
            "scoring_gemm_ceiling_gflops": scoring_ceiling / 1e9,
            "ours_seconds_per_problem_at_ceiling": at_ceiling,
            "speedup_bound_at_ceiling": theirs / at_ceiling,
            # were every part of ours but its weight products free (measured in the run)
            "speedup_bound_gemm_alone": theirs / all_in_flight["gemm_seconds_per_problem"],
            "speedup_per_generated_token": (theirs / (generated / PROBLEMS))
            / (all_in_flight["seconds_per_problem"] / all_in_flight["generated_tokens_per_problem"]),
            "ours_all_in_flight": all_in_flight,
            "ours_one_in_flight": one_in_flight,
            "speedup_all_in_flight": theirs / all_in_flight["seconds_per_problem"],
            "speedup_one_in_flight": theirs / one_in_flight["seconds_per_problem"],
        }
    )


@pytest.mark.parametrize("weights", ["dequantized", "packed"])
def test_beam_search_with_prm_weights(benchmark, weights):
    """Ours with every problem in flight, the policy and the PRM on SmolLM2's Q4_1 file either
    dequantized to bf16 at load or packed (multiplied in its quantized blocks): the same search
    and seeds; the packed products round x to int8 groups, so the sampled paths, and with them
    the tokens per problem, may differ a little. Run both in one session to compare."""
    config = SearchConfig(strategy="beam_search", **SETTINGS)
    prm = load_verifier("smollm2-135m", policy_engine=policy(weights), family="math-shepherd", tag=PRM_TAG)
    result = benchmark.pedantic(run_ours, args=(config, prm, PROBLEMS, policy(weights)), rounds=1, iterations=1)
    benchmark.extra_info.update({"problems": PROBLEMS, "dtype": str(policy(weights).dtype), "weights": weights,
                                 "weight_bytes": policy(weights).model.weight_bytes, **result})


@pytest.mark.parametrize("count", [24, 48])
def test_beam_search_with_prm_more_problems_in_flight(benchmark, count):
    """Ours alone (the plain baseline's time per problem does not depend on how many there
    are): time and work per problem with ``count`` problems, every one in flight, to set
    beside the 12 of ``test_beam_search_with_prm``."""
    config = SearchConfig(strategy="beam_search", **{**SETTINGS, "problems_in_flight": count})
    prm = load_verifier("smollm2-135m", policy_engine=policy(), family="math-shepherd", tag=PRM_TAG)
    result = benchmark.pedantic(run_ours, args=(config, prm, count), rounds=1, iterations=1)
    benchmark.extra_info.update({"problems": count, "dtype": str(policy().dtype), **result})
