"""The ``ttsearch`` command line."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "What is 12 * 7 + 5? Think step by step."


def _generate(args: argparse.Namespace) -> int:
    from ttsearch import Engine, SamplingParams

    engine = Engine(args.model, dtype=args.dtype)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttsearch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write reasoning steps for one prompt")
    gen.add_argument("--model", default="smollm2-135m", help="alias, Hugging Face directory or .gguf file")
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 where the CPU is fast at it")
    gen.add_argument("--max-steps", type=int, default=8)
    gen.add_argument("--max-step-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
