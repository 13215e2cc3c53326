"""Plot the shared-prefix decode sweep of ``bench_ops.py``'s json: time and bytes read
against N beams, one line per way and prefix length, with the unique-token bytes (the
prefix once, every beam's own tokens) as the floor any way could reach.

    python benchmarks/plot_sweep.py benchmarks/results/ops_cpu.json --dtype bf16
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def sweep_points(path: Path, dtype: str) -> dict[tuple[str, int], list[tuple[int, float, float, float]]]:
    """(way, prefix) -> sorted [(beams, median seconds, bytes read, unique bytes)]."""
    lines = defaultdict(list)
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if "prefix_tokens" not in info or f"-{dtype}-" not in bench["name"]:
            continue
        way = info.get("implementation") or info.get("impl")
        lines[(way, info["prefix_tokens"])].append(
            (info["beams"], bench["stats"]["median"], info["bytes"], info["unique_token_bytes"])
        )
    if not lines:
        raise SystemExit(f"{path}: no shared-prefix sweep results for dtype {dtype!r}")
    return {key: sorted(points) for key, points in lines.items()}


def plot(path: Path, dtype: str, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sweep_points(path, dtype)
    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {way: f"C{i}" for i, way in enumerate(sorted({w for w, _ in lines}))}
    for (way, prefix), points in sorted(lines.items()):
        beams, seconds, read, _ = zip(*points)
        # paged and plain torch read the same bytes: a wider paged line keeps both visible
        style = dict(marker="o", color=colors[way], linewidth=4 if "paged" in way else 1.5,
                     linestyle="-" if prefix == max(p for _, p in lines) else "--")
        time_ax.plot(beams, [s * 1e3 for s in seconds], label=f"{way}, P={prefix}", **style)
        bytes_ax.plot(beams, [b / 1e6 for b in read], label=f"{way}, P={prefix}", **style)
    for prefix in sorted({p for _, p in lines}):
        beams, _, _, unique = zip(*next(points for (_, p), points in lines.items() if p == prefix))
        bytes_ax.plot(beams, [u / 1e6 for u in unique], color="black", linestyle=":", marker="x",
                      label=f"unique tokens, P={prefix}")
    for ax, ylabel in ((time_ax, "median time per call (ms)"), (bytes_ax, "KV bytes read per call (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N beams sharing a P-token prefix (+64 own tokens each)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Shared-prefix decode attention, {dtype} ({path.name})")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    output = args.output or args.results.with_name(f"{args.results.stem}_sweep_{args.dtype}.png")
    print(f"plot: {plot(args.results, args.dtype, output)}")


if __name__ == "__main__":
    main()
