"""End-to-end decode on a CUDA GPU: a Llama-3.2-1B-shaped model, with and without CUDA graphs.

The model has Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 query heads, 8 kv heads,
head_dim 64, intermediate 8192, vocabulary 128256, tied embeddings, llama3 RoPE) and
random bfloat16 weights, drawn on the GPU: nothing is downloaded or written to disk. The
config goes through the loader's own parsing (``config_from_hf``) and the weights through
its shape check (``check_weights``); only reading the files is skipped.

One run measures, side by side:
- ``test_bf16_peak``: the best FLOP/s of a bfloat16 8192^3 ``torch.mm``, the dense peak
  this GPU reaches in practice;
- ``test_copy_bandwidth``: a 1 GiB device-to-device ``copy_`` (bytes read + written per
  second), its memory ceiling;
- ``test_decode[batch-graphs]``: one ``Engine.step`` (sampling included: greedy, which
  reads the tokens back) of ``batch`` sequences whose 512-token contexts share their first
  511 tokens, as the beams of one problem share its prompt (decode attention takes the
  shared-prefix path), with CUDA graphs ``on`` and ``off``. Reported: tokens/s, the
  fraction of the measured bf16 peak that the weight matmuls reach (matmul FLOPs per token
  x tokens/s / peak), the weight bytes read per second as a fraction of the copy
  bandwidth (a decode step reads every weight once), and for ``on`` the speed-up over
  ``off`` at the same batch.

Skipped without CUDA.

    python -m pytest benchmarks/bench_gpu_decode.py --benchmark-only \\
        --benchmark-json benchmarks/results/gpu_<name>_decode.json
"""

from __future__ import annotations

import functools
import math
import pathlib
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU decode benchmark needs a CUDA GPU", allow_module_level=True)

from ttsearch import Engine, ops  # noqa: E402
from ttsearch.engine import engine as engine_module  # noqa: E402
from ttsearch.models.checkpoint import Checkpoint, check_weights, expected_shapes  # noqa: E402
from ttsearch.models.hf import config_from_hf  # noqa: E402

DEVICE = torch.device("cuda")
GPU = torch.cuda.get_device_name(DEVICE)
LLAMA_3_2_1B = {  # config.json of meta-llama/Llama-3.2-1B, less its vocabulary's special ids
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
CONTEXT = 512  # tokens per sequence at the first measured step, all but the last shared
ROUNDS = 20
KV_CACHE_BYTES = 4 << 30
CASES = [(64, "off"), (64, "on"), (256, "off"), (256, "on")]  # off before on: "on" reports its speed-up
_tokens_per_s: dict[tuple[int, str], float] = {}


def tiny_tokenizer():
    """A two-token tokenizer: the engine reads only its EOS id; the benchmark feeds token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


@functools.cache
def checkpoint() -> Checkpoint:
    """The 1B-shaped checkpoint: weights N(0, 0.02) (norms 1) drawn in bfloat16 on the GPU."""
    config = config_from_hf(LLAMA_3_2_1B, "Llama-3.2-1B shapes, random weights")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
        else:
            weights[name] = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE).normal_(0, 0.02, generator=gen)
    files = dict.fromkeys(weights, "<random>")
    check_weights(config, weights, files)
    return Checkpoint(config, weights, tiny_tokenizer(), pathlib.Path(config.source), files)


@functools.cache
def engine_for(graphs: str) -> Engine:
    """An engine on the checkpoint above (loaded as the loader would return it), with CUDA graphs on or off."""

    def load(name, progress=True):
        return checkpoint()

    with mock.patch.object(engine_module, "load_checkpoint", load):
        engine = Engine("llama-3.2-1b-random", dtype="bfloat16", device="cuda", kv_cache_bytes=KV_CACHE_BYTES,
                        progress=False, cuda_graphs=graphs == "on")
    assert (engine.runner.graphs is not None) == (graphs == "on")
    return engine


def best_seconds(fn, runs: int, repeats: int = 5) -> float:
    """Best of ``repeats`` timings (CUDA events) of ``runs`` back-to-back calls, per call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(repeats):
        start.record()
        for _ in range(runs):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / runs)
    return best


@functools.cache
def bf16_peak() -> float:
    """FLOP/s of a bfloat16 8192^3 matmul, best of 5 timings of 5 calls."""
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), 5)


@functools.cache
def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy_."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / best_seconds(lambda: dst.copy_(src), 3)


def test_bf16_peak(benchmark):
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)

    def mm():
        torch.mm(a, a)
        torch.cuda.synchronize()

    benchmark.pedantic(mm, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"gpu": GPU, "matrix_size": n, "peak_tflops": bf16_peak() / 1e12})


def test_copy_bandwidth(benchmark):
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(copy, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"gpu": GPU, "bytes": src.numel(), "best_bytes_per_s": copy_bandwidth()})


@pytest.mark.parametrize("batch,graphs", CASES, ids=[f"{b}-graphs_{g}" for b, g in CASES])
def test_decode(benchmark, batch, graphs):
    engine = engine_for(graphs)
    prompt = torch.randint(100, 100_000, (CONTEXT - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    root = engine.add(prompt)
    beams = engine.fork(root, batch)
    engine.append_batch(beams, [[100_000 + i] for i in range(batch)])  # distinct last tokens (a decode forward)
    engine.free(root)
    engine.step(beams)  # with graphs: this bucket is captured by now
    replays = engine.runner.graphs.replays if engine.runner.graphs is not None else 0
    benchmark.pedantic(engine.step, args=(beams,), rounds=ROUNDS, warmup_rounds=2)
    tree = engine.runner.last_prefix_tree
    for seq in beams:
        engine.free(seq)

    seconds = benchmark.stats["mean"]
    tokens_per_s = batch / seconds
    _tokens_per_s[batch, graphs] = tokens_per_s
    model = engine.model
    peak, bandwidth = bf16_peak(), copy_bandwidth()
    matmul_flops = model.matmul_flops_per_token() * tokens_per_s
    info = {
        "gpu": GPU,
        "model": "Llama-3.2-1B shapes, random bf16 weights",
        "ops_implementation": ops.IMPLEMENTATIONS.get("cuda"),
        "batch": batch,
        "context": CONTEXT,
        "cuda_graphs": graphs == "on",
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_s,
        "matmul_flops_per_token": model.matmul_flops_per_token(),
        "matmul_tflops": matmul_flops / 1e12,
        "peak_tflops": peak / 1e12,
        "fraction_of_peak": matmul_flops / peak,
        "weight_bytes": model.weight_bytes,
        "weight_bytes_per_s": model.weight_bytes / seconds,
        "copy_bytes_per_s": bandwidth,
        "weight_read_fraction_of_copy": model.weight_bytes / seconds / bandwidth,
        "prefix_tree_nodes": len(tree.nodes) if tree is not None else 0,
    }
    if engine.runner.graphs is not None:
        info["replays"] = engine.runner.graphs.replays - replays
        info["graphs_captured"] = engine.runner.graphs.captures
    if graphs == "on" and (batch, "off") in _tokens_per_s:
        info["speedup_over_graphs_off"] = tokens_per_s / _tokens_per_s[batch, "off"]
    benchmark.extra_info.update(info)
