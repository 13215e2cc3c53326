"""Accuracy tables and plots from run records (the JSON lines ``ttsearch run`` writes)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def run_label(record: dict) -> str:
    """A curve: runs of one strategy (and beam width) at every budget n draw one line."""
    if record["strategy"] in ("beam_search", "dvts"):
        return f"{record['strategy']} M={record['beam_width']}"
    return record["strategy"]


def _curve(record: dict, budget: int) -> str:
    """The curve a record's selection at ``budget`` belongs to. Best-of-N's first N samples
    are a best-of-N run at N; DVTS's first N answers are not a DVTS run at N (labelled
    subsampled); beam search selects only at its own n."""
    label = run_label(record)
    return f"{label} (subsampled)" if record["strategy"] == "dvts" and budget < record["n"] else label


def accuracy_rows(records: list[dict]) -> list[dict]:
    """One row per (curve, selection, N): accuracy overall and per level, and the tokens per
    problem (generated + verified) of the runs made at exactly that N. A problem counts once
    per cell: from the run at N itself when there is one, else the smallest n above it."""
    outcome: dict[tuple, tuple[int, dict, dict]] = {}  # (curve, selection, N, id) -> (n, outcome, record)
    for r in records:
        for selection, per_budget in r["selections"].items():
            for budget, result in per_budget.items():
                key = (_curve(r, int(budget)), selection, int(budget), r["id"])
                if key not in outcome or r["n"] < outcome[key][0]:
                    outcome[key] = (r["n"], result, r)
    cells = defaultdict(lambda: [0, 0])
    levels = defaultdict(lambda: [0, 0])
    tokens = defaultdict(list)
    for (curve, selection, budget, _), (n, result, r) in outcome.items():
        key = (curve, selection, budget)
        cells[key][0] += bool(result["correct"])
        cells[key][1] += 1
        if n == budget and "tokens_generated" in r:
            tokens[key].append(r["tokens_generated"] + r.get("tokens_verified", 0))
        if r.get("level") is not None:
            lk = key + (str(r["level"]),)
            levels[lk][0] += bool(result["correct"])
            levels[lk][1] += 1
    rows = []
    for (label, selection, budget), (hit, total) in sorted(cells.items()):
        by_level = {
            lk[3]: hits / n for lk, (hits, n) in sorted(levels.items()) if lk[:3] == (label, selection, budget)
        }
        spent = tokens.get((label, selection, budget))
        rows.append({"run": label, "selection": selection, "N": budget, "accuracy": hit / total,
                     "problems": total, "tokens_per_problem": sum(spent) / len(spent) if spent else None,
                     "by_level": by_level})
    return rows


def format_rows(rows: list[dict]) -> str:
    level_names = sorted({lv for row in rows for lv in row["by_level"]}, key=_level_order)
    header = f"{'run':<28} {'selection':<9} {'N':>4} {'accuracy':>9} {'problems':>8} {'tokens/problem':>14}"
    header += "".join(f" {'L' + lv if lv.isdigit() else lv:>7}" for lv in level_names)
    lines = [header, "-" * len(header)]
    for row in rows:
        spent = f"{row['tokens_per_problem']:.0f}" if row["tokens_per_problem"] is not None else "-"
        line = f"{row['run']:<28} {row['selection']:<9} {row['N']:>4} {row['accuracy']:>9.3f} {row['problems']:>8} {spent:>14}"
        line += "".join(f" {row['by_level'][lv]:>7.3f}" if lv in row["by_level"] else f" {'':>7}" for lv in level_names)
        lines.append(line)
    return "\n".join(lines)


def _level_order(level: str):
    digits = "".join(ch for ch in level if ch.isdigit())
    return (int(digits) if digits else 0, level)


def plot_accuracy(records: list[dict], path: str | Path, title: str = "Accuracy against N") -> Path:
    """Accuracy against N on a log2 axis, one line per run and selection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = accuracy_rows(records)
    lines = defaultdict(list)
    for row in rows:
        lines[(row["run"], row["selection"])].append((row["N"], row["accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (run, selection), points in sorted(lines.items()):
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", linestyle="--" if run.endswith("(subsampled)") else "-",
                label=f"{run} / {selection}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (paths per problem)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
