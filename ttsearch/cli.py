"""The ``ttsearch`` command line: run | serve | eval | plot | tree | fit | demo | generate."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from ttsearch import batch_invariant

DEFAULT_PROMPT = "What is 12 * 7 + 5? Think step by step."


# ----------------------------------------------------------------------------- run
def _add_search_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file of search settings, ours or a search-and-learn recipe's; "
                                    "flags given here override it")
    p.add_argument("--strategy", help="best_of_n | beam_search | dvts | particle_filter | rebase | compute_optimal, "
                                      "or a name given to ttsearch.register_strategy")
    p.add_argument("--n", type=_budget_list, help="samples / live beams / budget; a list (4,16,64) runs one search per n")
    p.add_argument("--beam-width", type=int, help="M: beam search keeps n/M beams; a DVTS subtree writes M candidates")
    p.add_argument("--max-iterations", type=int, help="beam search / DVTS iterations; the last one writes to EOS")
    p.add_argument("--max-tokens", type=int, help="the last iteration's budget, a best-of-N sample's, and the step limit")
    p.add_argument("--max-step-tokens", type=int, help="a step's limit, when it should differ from --max-tokens")
    p.add_argument("--lookahead", type=int)
    p.add_argument("--aggregation", help="last | min | prod | mean")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--problems-in-flight", type=int)
    p.add_argument("--stop-at-n-finished", action="store_const", const=True,
                   help="beam search ends once n paths have finished (not search-and-learn's rule)")
    p.add_argument("--drop-length-cuts", action="store_const", const=True,
                   help="a path cut by a token limit is not an answer (not search-and-learn's rule)")
    p.add_argument("--optimal-table", help="compute_optimal: the table from `ttsearch fit`")
    p.add_argument("--resampling", help="particle_filter: multinomial | systematic")
    p.add_argument("--particle-weights", help="particle_filter: logit (of the reward, as Puri et al.) | reward")
    p.add_argument("--resample-temperature", type=float, help="particle_filter: softmax(log-weight / T)")
    p.add_argument("--balance-temperature", type=float, help="rebase: the width budget follows softmax(reward / T)")
    p.add_argument("--stop-agree", type=int, help="stop a problem once K of its latest finished answers are equal")
    p.add_argument("--stop-share", type=float, help="stop a problem once its leading answer holds this share of the "
                                                     "latest finished answers' scores")
    p.add_argument("--stop-window", type=int, help="how many latest finished answers --stop-agree/--stop-share read")


SEARCH_FLAGS = ("strategy", "beam_width", "max_iterations", "max_tokens", "max_step_tokens", "lookahead",
                "aggregation", "temperature", "top_p", "top_k", "seed", "problems_in_flight", "stop_at_n_finished",
                "drop_length_cuts", "optimal_table", "resampling", "particle_weights", "resample_temperature",
                "balance_temperature", "stop_agree", "stop_share", "stop_window")


def _budget_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list such as 4,16,64, got {text!r}")
    return values


def _settings(args: argparse.Namespace):
    """(SearchConfig, the budgets to run, run settings from the config file) from the file and the flags."""
    from ttsearch.search.config import SearchConfig, read_config_file, split_settings

    source = args.config or "flags"
    values, run_values = split_settings(read_config_file(args.config), source) if args.config else ({}, {})
    values.update({k: getattr(args, k) for k in SEARCH_FLAGS if getattr(args, k) is not None})
    ns = args.n
    if ns is None and isinstance(values.get("n"), list):
        ns = values["n"]
    if ns is not None:
        values["n"] = ns[0]
    return SearchConfig.from_dict(values, source=source), ns, run_values


def _json_flag(flag: str, value: str | None) -> dict | None:
    from ttsearch.search.config import ConfigError

    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc.msg})") from exc
    if not isinstance(parsed, dict):
        raise ConfigError(f"{flag}: expected a JSON object")
    return parsed


def _run(args: argparse.Namespace) -> int:
    from ttsearch.search import run

    config, ns, recipe = _settings(args)
    fields = _json_flag("--fields", args.fields)
    options = _json_flag("--verifier-options", args.verifier_options)
    stats = run(config, args.output, model=args.model or recipe.get("model", "smollm2-135m"),
                verifier=args.verifier or recipe.get("verifier", "arithmetic"), verifier_options=options,
                dataset=args.dataset or recipe.get("dataset"), limit=args.limit if args.limit is not None else
                recipe.get("limit"), fields=fields, dtype=args.dtype, weights=args.weights,
                kv_cache_bytes=_kv_cache_bytes(args.kv_cache_gib),
                ns=ns, start=recipe.get("start"), end=recipe.get("end"), workers=args.workers,
                ray_address=args.ray_address, imports=args.imports, worker_threads=args.worker_threads)
    if isinstance(stats, dict):  # a run on Ray workers
        lost = ", ".join(map(str, stats["workers_lost"])) or "none"
        print(f"{stats['workers']} workers, lost: {lost}; {stats['requeued']} problems requeued")
    elif stats is not None:
        print(f"decode batch occupancy {stats.occupancy:.2f}, scoring {stats.score_seconds:.1f} s of "
              f"{stats.decode_seconds + stats.score_seconds:.1f} s, {stats.preemptions} preemptions")
    print(f"results: {args.output}")
    return 0


def _kv_cache_bytes(gib: float | None) -> int | None:
    from ttsearch.search.config import ConfigError

    if gib is None:
        return None
    if not gib > 0:
        raise ConfigError(f"--kv-cache-gib={gib}: expected a positive size")
    return int(gib * (1 << 30))


# ----------------------------------------------------------------------------- eval / plot / fit
def _records(paths: list[str]) -> list[dict]:
    from ttsearch.search.results import read_results

    records = []
    for path in paths:
        records += read_results(path)
    if not records:
        raise SystemExit(f"no results in {', '.join(paths)}")
    return records


def _eval(args: argparse.Namespace) -> int:
    from ttsearch.eval.report import accuracy_rows, early_stop_rows, format_early_stop_rows, format_rows

    records = _records(args.results)
    rows, stops = accuracy_rows(records), early_stop_rows(records)
    if args.json:
        print(json.dumps({"accuracy": rows, "early_stop": stops}, indent=1))
        return 0
    print(format_rows(rows))
    if stops:
        print("\n" + format_early_stop_rows(stops))
    return 0


def _tree(args: argparse.Namespace) -> int:
    from ttsearch.eval.tree import draw_tree, find_record

    drawing = draw_tree(find_record(_records([args.results]), args.problem, args.strategy, args.n), args.output)
    print(f"tree: {drawing.path} ({drawing.nodes} steps, {drawing.answers} answers)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ttsearch.eval.report import plot_accuracy

    print(f"plot: {plot_accuracy(_records(args.results), args.output)}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from ttsearch.search.strategies.compute_optimal import fit_table

    table = fit_table(_records(args.results), pilot_samples=args.pilot_samples, bins=args.bins)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(table, indent=1) + "\n")
    print(f"table: {args.output}")
    return 0


# ----------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    from ttsearch.api import Searcher
    from ttsearch.serve import serve

    config, ns, recipe = _settings(args)
    if ns is not None and len(ns) > 1:
        from ttsearch.search.config import ConfigError

        raise ConfigError(f"--n {','.join(map(str, ns))}: a server's default is one n (requests may set their own)")
    if not 0 < args.port < 65536:
        from ttsearch.search.config import ConfigError

        raise ConfigError(f"--port={args.port}: expected 1-65535")
    searcher = Searcher(args.model or recipe.get("model", "smollm2-135m"),
                        args.verifier or recipe.get("verifier", "arithmetic"),
                        verifier_options=_json_flag("--verifier-options", args.verifier_options), dtype=args.dtype,
                        weights=args.weights, kv_cache_gib=args.kv_cache_gib, progress=True,
                        prefix_caching=not args.no_prefix_caching, config=config)
    searched = f"every chat request searched with {config.strategy} n={config.n}" if args.search_by_default else \
        f"generation, and {config.strategy} n={config.n} for requests with a search object"
    print(f"serving {searcher.policy.name} ({searcher.policy.dtype}): {searched}, on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    serve(searcher, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level,
          search_by_default=args.search_by_default)
    return 0


# ----------------------------------------------------------------------------- demo / generate
def _demo(args: argparse.Namespace) -> int:
    from ttsearch.demo import run_demo

    return run_demo(args.output_dir, limit=args.limit, n=args.n)


def _generate(args: argparse.Namespace) -> int:
    from ttsearch import Engine, SamplingParams

    engine = Engine(args.model, dtype=args.dtype, weights=args.weights)
    messages = [{"role": "user", "content": args.prompt}]
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    seq = engine.add(engine.tokenizer.encode(prompt, add_special_tokens=False))
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(f"model {args.model} ({engine.dtype}), prompt: {args.prompt}\n", flush=True)
    start, generated = time.perf_counter(), 0
    for number in range(1, args.max_steps + 1):
        (step,) = engine.generate_step([seq], sampling, max_tokens=args.max_step_tokens)
        generated += len(step.token_ids)
        print(f"[step {number}, {step.finish_reason}] {step.text.strip()}", flush=True)
        if step.finish_reason == "eos" or len(seq) >= engine.max_model_len:
            break
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    print(
        f"\n{generated} tokens in {elapsed:.1f} s ({generated / elapsed:.1f} tokens/s); "
        f"KV cache: {stats['blocks_used']} blocks, {stats['kv_bytes_used'] / 2**20:.1f} MiB"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttsearch", description="Test-time-scaling search for small language models.")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="log one line per problem or request at info (default: warning)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module first, e.g. one that registers strategies or verifiers")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="a sequence's tokens do not depend on what else is in its batch, in any dtype "
                        "(slower; see ttsearch/batch_invariant.py)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="search a dataset, one JSON line per problem (resumes)")
    run.add_argument("--model", help="alias, Hugging Face directory or .gguf file (default smollm2-135m)")
    run.add_argument("--verifier", help="arithmetic (default) | self | a registered name | a PRM's directory, .gguf or alias")
    run.add_argument("--verifier-options", help='JSON options for the verifier, e.g. {"family": "math-shepherd", "tag": "ки"}')
    run.add_argument("--dataset", help="JSONL file (MATH-500, GSM8K or mapped fields); default: bundled arithmetic")
    run.add_argument("--fields", help='JSON mapping for other datasets, e.g. {"question": "prompt", "answer": "target"}')
    run.add_argument("--limit", type=int, help="first N problems")
    run.add_argument("--output", required=True, help="results JSONL (appended; finished searches are skipped, "
                                                    "the file's settings must match)")
    run.add_argument("--dtype", choices=["float32", "bfloat16"])
    run.add_argument("--weights", choices=["auto", "dequantized", "packed"], default="auto",
                     help="a GGUF model's quantized matrices: dequantized at load, or kept packed in their blocks "
                          "(auto: packed on a CPU with AVX512-VNNI and no AMX, where that is no slower)")
    run.add_argument("--kv-cache-gib", type=float, help="the policy's KV pool in GiB (default 1)")
    run.add_argument("--workers", type=int, help="spread the problems over N Ray workers (a local Ray instance)")
    run.add_argument("--ray-address", help="join this Ray cluster (host:port or 'auto') instead of starting one")
    run.add_argument("--worker-threads", type=int, help="CPU threads per worker (default: an equal share of the cores)")
    _add_search_flags(run)
    run.set_defaults(func=_run)

    srv = sub.add_parser("serve", help="an OpenAI-compatible server (FastAPI + uvicorn): searches, vLLM-style "
                                        "generation and step scoring on one engine")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="requests must send 'Authorization: Bearer KEY'")
    srv.add_argument("--search-by-default", action="store_true",
                     help="search every chat request (a request without a search object gets the server's settings); "
                          "otherwise such a request is plain generation")
    srv.add_argument("--no-prefix-caching", action="store_true",
                     help="no prefix cache: every request prefills its whole prompt (to measure what reuse saves)")
    srv.add_argument("--model", help="alias, Hugging Face directory or .gguf file (default smollm2-135m)")
    srv.add_argument("--verifier", help="arithmetic (default) | self | a registered name | a PRM's directory")
    srv.add_argument("--verifier-options", help="JSON options for the verifier")
    srv.add_argument("--dtype", choices=["float32", "bfloat16"])
    srv.add_argument("--weights", choices=["auto", "dequantized", "packed"], default="auto",
                     help="a GGUF model's quantized matrices: dequantized at load, or kept packed in their blocks "
                          "(auto: packed on a CPU with AVX512-VNNI and no AMX, where that is no slower)")
    srv.add_argument("--kv-cache-gib", type=float, help="the policy's KV pool in GiB (default 1)")
    _add_search_flags(srv)
    srv.set_defaults(func=_serve)

    ev = sub.add_parser("eval", help="accuracy per strategy x selection x N, overall and by level")
    ev.add_argument("results", nargs="+")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_eval)

    tree = sub.add_parser("tree", help="draw one problem's search tree (.png or .svg)")
    tree.add_argument("results")
    tree.add_argument("--problem", required=True, help="the problem's id")
    tree.add_argument("--strategy", help="when the results hold several searches of the problem")
    tree.add_argument("--n", type=int, help="when the results hold several searches of the problem")
    tree.add_argument("--output", default="tree.png")
    tree.set_defaults(func=_tree)

    plot = sub.add_parser("plot", help="PNG of accuracy against N and against tokens per problem")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--output", default="accuracy.png")
    plot.set_defaults(func=_plot)

    fit = sub.add_parser("fit", help="fit compute_optimal's table from runs on a dev split")
    fit.add_argument("results", nargs="+")
    fit.add_argument("--output", required=True)
    fit.add_argument("--pilot-samples", type=int, default=4)
    fit.add_argument("--bins", type=int, default=4)
    fit.set_defaults(func=_fit)

    demo = sub.add_parser("demo", help="SmolLM2-135M + arithmetic checker: accuracy gained by search")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--limit", type=int, default=None)
    demo.add_argument("--n", type=int, default=None)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="write reasoning steps for one prompt")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"])
    gen.add_argument("--weights", choices=["auto", "dequantized", "packed"], default="auto",
                     help="a GGUF model's quantized matrices: dequantized at load, or kept packed in their blocks "
                          "(auto: packed on a CPU with AVX512-VNNI and no AMX, where that is no slower)")
    gen.add_argument("--max-steps", type=int, default=8)
    gen.add_argument("--max-step-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ttsearch.errors import TTSearchError
    from ttsearch.search.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_invariant:
        batch_invariant.set_enabled(True)
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"ttsearch: error: --import {module}: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ConfigError, TTSearchError, FileNotFoundError) as exc:
        print(f"ttsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ttsearch {args.command}: interrupted; finished problems are saved, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
