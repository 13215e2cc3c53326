"""Accuracy tables and plots from run records (the JSON lines ``ttsearch run`` writes)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def run_label(record: dict) -> str:
    """A curve: runs of one strategy (and beam width, and early-stopping rule) at every budget
    n draw one line."""
    label = record["strategy"]
    if label in ("beam_search", "dvts"):
        label += f" M={record['beam_width']}"
    rules = record.get("rules", {})
    if rules.get("stop_agree") or rules.get("stop_share"):
        label += " " + _stop_label(rules)
    return label


def _stop_label(rules: dict) -> str:
    window = rules["stop_window"]
    parts = ([f"{rules['stop_agree']}/{window} agree"] if rules.get("stop_agree") else []) + (
        [f"share>={rules['stop_share']:g} of {window}"] if rules.get("stop_share") else [])
    return "+stop " + " or ".join(parts)


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


def early_stop_rows(records: list[dict]) -> list[dict]:
    """What early stopping saved: for each early-stopped curve and N, the same search without
    it (same strategy, beam width and n) on the problems both ran, with tokens per problem
    (generated + verified) and naive-selection accuracy side by side."""
    def spent(r: dict) -> int:
        return r["tokens_generated"] + r.get("tokens_verified", 0)

    plain = {(r["strategy"], r["beam_width"], r["n"], r["id"]): r for r in records if not _stops(r)}
    pairs = defaultdict(list)
    for r in records:
        base = plain.get((r["strategy"], r["beam_width"], r["n"], r["id"]))
        if _stops(r) and base is not None:
            pairs[(run_label(r), r["n"])].append((r, base))
    rows = []
    for (label, n), matched in sorted(pairs.items()):
        with_stop = sum(spent(r) for r, _ in matched) / len(matched)
        without = sum(spent(b) for _, b in matched) / len(matched)
        rows.append({
            "run": label, "N": n, "problems": len(matched),
            "stopped_early": sum("early_stop" in r for r, _ in matched),
            "tokens_per_problem": with_stop, "tokens_without": without, "saved": 1 - with_stop / without if without else 0.0,
            "accuracy": sum(r["selections"]["naive"][str(n)]["correct"] for r, _ in matched) / len(matched),
            "accuracy_without": sum(b["selections"]["naive"][str(n)]["correct"] for _, b in matched) / len(matched),
        })
    return rows


def format_early_stop_rows(rows: list[dict]) -> str:
    header = (f"{'early-stopped run':<40} {'N':>4} {'problems':>8} {'stopped':>7} {'tokens/problem':>14} "
              f"{'without':>8} {'saved':>6} {'accuracy':>8} {'without':>8}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['run']:<40} {row['N']:>4} {row['problems']:>8} {row['stopped_early']:>7} "
                     f"{row['tokens_per_problem']:>14.0f} {row['tokens_without']:>8.0f} {row['saved']:>6.1%} "
                     f"{row['accuracy']:>8.3f} {row['accuracy_without']:>8.3f}")
    return "\n".join(lines)


def _stops(record: dict) -> bool:
    rules = record.get("rules", {})
    return bool(rules.get("stop_agree") or rules.get("stop_share"))


def _level_order(level: str):
    digits = "".join(ch for ch in level if ch.isdigit())
    return (int(digits) if digits else 0, level)


def plot_accuracy(records: list[dict], path: str | Path, title: str = "Accuracy against N and against compute") -> Path:
    """Two panels, one line per run and selection: accuracy against N (log2 axis), and
    accuracy against tokens per problem (generated + verified), so runs that spend
    differently per path are compared at equal compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = accuracy_rows(records)
    by_n, by_tokens = defaultdict(list), defaultdict(list)
    for row in rows:
        key = (row["run"], row["selection"])
        by_n[key].append((row["N"], row["accuracy"]))
        if row["tokens_per_problem"] is not None:
            by_tokens[key].append((row["tokens_per_problem"], row["accuracy"]))
    legend_rows = -(-len(by_n) // 3)  # the legend goes below, three columns
    fig, (ax_n, ax_tokens) = plt.subplots(1, 2, figsize=(13, 5 + 0.2 * legend_rows), sharey=True)
    palette = plt.get_cmap("tab20" if len(by_n) > 10 else "tab10")
    colors = {}
    for i, (key, points) in enumerate(sorted(by_n.items())):
        run, selection = key
        points.sort()
        xs, ys = zip(*points)
        (line,) = ax_n.plot(xs, ys, marker="o", linestyle="--" if run.endswith("(subsampled)") else "-",
                            color=palette(i % palette.N), label=f"{run} / {selection}")
        colors[key] = line.get_color()
    for key, points in sorted(by_tokens.items()):
        points.sort()
        xs, ys = zip(*points)
        ax_tokens.plot(xs, ys, marker="o", color=colors[key])
    ax_n.set_xscale("log", base=2)
    ax_n.set_xlabel("N (paths per problem)")
    ax_tokens.set_xscale("log")
    ax_tokens.set_xlabel("tokens per problem (generated + verified)")
    ax_n.set_ylabel("accuracy")
    ax_n.set_ylim(0, 1)
    for ax in (ax_n, ax_tokens):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.legend(*ax_n.get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.2 * legend_rows / (5 + 0.2 * legend_rows) + 0.02, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
