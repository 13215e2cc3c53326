"""End-to-end beam search on a CUDA GPU: SmolLM2-135M in bfloat16, with CUDA graphs against eager.

- ``test_beam_search_with_prm[graphs_off|graphs_on]``: bench_search.py's beam search with
  SmolLM2 as its own Math-Shepherd-format PRM (the same engine scores the steps), over the
  same first bundled arithmetic problems with the same settings and seeds (``SETTINGS``,
  every problem in flight), on an engine in bfloat16 on CUDA with decode forwards replaying
  CUDA graphs (``on``) or launched eagerly (``off``). Each side runs the whole search once
  untimed first (Triton's compiles, the graph captures, the allocator's warm-up), then once
  timed. Reported: seconds and generated / verified tokens per problem (the tokens should
  agree between the two sides up to bf16 ties), decode batch occupancy, graph replays and
  captures, and for ``on`` the speed-up over ``off`` and whether every problem generated
  the same number of tokens.

Skipped without CUDA.

    python -m pytest benchmarks/bench_gpu_search.py --benchmark-only \\
        --benchmark-json benchmarks/results/gpu_<name>_search.json
"""

from __future__ import annotations

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the GPU search benchmark needs a CUDA GPU", allow_module_level=True)

from bench_search import PRM_TAG, PROBLEMS, SETTINGS, run_ours  # noqa: E402
from ttsearch import ops  # noqa: E402
from ttsearch.engine.engine import Engine  # noqa: E402
from ttsearch.search import SearchConfig  # noqa: E402
from ttsearch.verifiers import load_verifier  # noqa: E402

GPU = torch.cuda.get_device_name()
_results: dict[str, dict] = {}


@pytest.mark.parametrize("graphs", ["off", "on"], ids=["graphs_off", "graphs_on"])
def test_beam_search_with_prm(benchmark, graphs):
    engine = Engine("smollm2-135m", dtype="bfloat16", device="cuda", kv_cache_bytes=1 << 30, progress=False,
                    cuda_graphs=graphs == "on")
    assert (engine.runner.graphs is not None) == (graphs == "on")
    prm = load_verifier("smollm2-135m", policy_engine=engine, family="math-shepherd", tag=PRM_TAG)
    config = SearchConfig(strategy="beam_search", **SETTINGS)
    result = benchmark.pedantic(run_ours, args=(config, prm), kwargs={"engine": engine}, rounds=1, iterations=1,
                                warmup_rounds=1)
    # weight products are timed on the host, which means nothing for asynchronous CUDA work
    result = {k: v for k, v in result.items() if not k.startswith("gemm_")}
    _results[graphs] = result
    info = {"gpu": GPU, "problems": PROBLEMS, "dtype": str(engine.dtype), "device": str(engine.device),
            "ops_implementation": ops.IMPLEMENTATIONS.get("cuda"), "cuda_graphs": graphs == "on",
            "settings": {k: v for k, v in SETTINGS.items() if isinstance(v, (int, float))}, **result}
    if engine.runner.graphs is not None:
        info["graph_replays"] = engine.runner.graphs.replays
        info["graphs_captured"] = engine.runner.graphs.captures
    if graphs == "on" and "off" in _results:
        eager = _results["off"]
        info["speedup_over_graphs_off"] = eager["seconds_per_problem"] / result["seconds_per_problem"]
        info["same_generated_tokens_as_graphs_off"] = (
            eager["generated_tokens_by_problem"] == result["generated_tokens_by_problem"])
    benchmark.extra_info.update(info)
    del prm, engine
    gc.collect()
    torch.cuda.empty_cache()
