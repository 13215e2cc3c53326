"""One problem's search tree, drawn from its record: a node per scored step.

Every record keeps its tree in ``nodes`` (each step's parent, score, tokens and text) and
marks each answer's last node in ``completions``. The drawing puts depth on x and spreads
leaves on y; a node's colour is its verifier score; steps on no answer's path (pruned
branches, lookahead rollouts, stopped paths) are faded; the chosen answer's path (naive
selection: the best-scored answer) is drawn bold, and each answer is marked correct or wrong
when the record was graded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ttsearch.errors import TTSearchError
from ttsearch.eval.grading import answer_key
from ttsearch.eval.selection import chosen_index


class TreeError(TTSearchError, ValueError):
    """A record that cannot be drawn, or a problem the results do not hold."""


@dataclass
class TreeDrawing:
    path: Path
    nodes: int  # scored steps drawn
    answers: int  # answer markers drawn
    chosen_path: list[int]  # node ids from the first step to the chosen answer


def find_record(records: list[dict], problem: str, strategy: str | None = None, n: int | None = None) -> dict:
    """The one record of ``problem`` (narrowed by ``strategy`` and ``n``); an error lists the
    choices when there are several or names what exists when there is none."""
    same = [r for r in records if str(r["id"]) == problem]
    if not same:
        known = ", ".join(sorted({str(r["id"]) for r in records})[:10])
        raise TreeError(f"no record for problem {problem!r}; the results hold e.g. {known}")
    chosen = [r for r in same if (strategy is None or r["strategy"] == strategy) and (n is None or r["n"] == n)]
    if len(chosen) != 1:
        options = ", ".join(f"--strategy {r['strategy']} --n {r['n']}" for r in same)
        what = "several records" if chosen else "no record with those settings"
        raise TreeError(f"problem {problem!r}: {what}; choose one of: {options}")
    return chosen[0]


def path_to(node: int | None, nodes: list[dict]) -> list[int]:
    """The node ids from the first step down to ``node`` (a record's or a search's ``nodes``:
    a node's id is its index)."""
    path = []
    while node is not None:
        path.append(node)
        node = nodes[node]["parent"]
    return path[::-1]


def layout(nodes: list[dict]) -> dict[int, tuple[float, float]]:
    """(depth, height) per node: leaves one unit apart in depth-first order, a parent at the
    middle of its children, the roots' prompt at depth 0."""
    children: dict[int | None, list[int]] = {}
    for node in nodes:
        children.setdefault(node["parent"], []).append(node["id"])
    position: dict[int, tuple[float, float]] = {}
    next_leaf = 0.0
    # depth-first without recursion: a best-of-N path can be hundreds of steps deep
    stack = [(root, 1, False) for root in reversed(children.get(None, []))]
    while stack:
        node_id, depth, placed_children = stack.pop()
        kids = children.get(node_id, [])
        if not kids:
            position[node_id], next_leaf = (depth, next_leaf), next_leaf + 1
        elif placed_children:
            position[node_id] = (depth, (position[kids[0]][1] + position[kids[-1]][1]) / 2)
        else:
            stack.append((node_id, depth, True))
            stack += [(kid, depth + 1, False) for kid in reversed(kids)]
    return position


def draw_tree(record: dict, output: str | Path) -> TreeDrawing:
    """Draw ``record``'s tree to ``output`` (.png, .svg or .pdf, by its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    nodes = record.get("nodes")
    if not nodes:
        raise TreeError(f"record {record.get('id')!r} holds no tree (no 'nodes'): it was written before records "
                        "kept one; rerun the search to draw it")
    completions = record.get("completions", [])
    on_answer_path = {i for c in completions if c.get("node") is not None for i in path_to(c["node"], nodes)}
    chosen = chosen_index([(c.get("answer"), c["aggregate"]) for c in completions], "naive", key=answer_key)
    if chosen is not None and completions[chosen].get("answer") is None:
        chosen = None  # no answer was chosen: no path to mark
    chosen_path = path_to(completions[chosen]["node"], nodes) if chosen is not None else []
    position = layout(nodes)
    scores = [node["score"] for node in nodes if node["score"] is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    cmap = plt.get_cmap("viridis")

    height = max(4.0, min(40.0, 0.25 * (max((y for _, y in position.values()), default=0) + 2)))
    width = max(6.0, min(40.0, 1.2 * (max((x for x, _ in position.values()), default=0) + 2)))
    fig, ax = plt.subplots(figsize=(width, height))
    roots = [node["id"] for node in nodes if node["parent"] is None]
    root_y = (sum(position[r][1] for r in roots) / len(roots)) if roots else 0.0

    edges, edge_colors = [], []
    for node in nodes:
        start = (0, root_y) if node["parent"] is None else position[node["parent"]]
        edges.append([start, position[node["id"]]])
        edge_colors.append((0.3, 0.3, 0.3, 0.8 if node["id"] in on_answer_path else 0.15))
    ax.add_collection(LineCollection(edges, colors=edge_colors, linewidths=0.8, zorder=1))
    if chosen_path:
        xs = [0] + [position[i][0] for i in chosen_path]
        ys = [root_y] + [position[i][1] for i in chosen_path]
        ax.plot(xs, ys, color="crimson", linewidth=2.5, zorder=2, label="chosen answer's path")

    colors = []
    for node in nodes:
        rgba = list(cmap((node["score"] - low) / (high - low))) if node["score"] is not None else [0.6, 0.6, 0.6, 1.0]
        rgba[3] = 1.0 if node["id"] in on_answer_path else 0.25
        colors.append(rgba)
    xs = [position[node["id"]][0] for node in nodes]
    ys = [position[node["id"]][1] for node in nodes]
    points = ax.scatter(xs, ys, c=colors, s=36, edgecolors="none", zorder=3)
    points.set_gid("steps")
    ax.scatter([0], [root_y], marker="s", s=60, color="black", zorder=3).set_gid("prompt")

    marked = 0
    for kind, style in (("correct", dict(marker="o", facecolors="none", edgecolors="green", label="correct answer")),
                        ("wrong", dict(marker="X", color="red", label="wrong answer")),
                        ("ungraded", dict(marker="o", facecolors="none", edgecolors="black", label="answer"))):
        ends = [c["node"] for c in completions if c.get("node") is not None and _grade(c) == kind]
        if ends:
            ax.scatter([position[i][0] for i in ends], [position[i][1] for i in ends], s=130, linewidths=1.5,
                       zorder=4, **style).set_gid(f"answers-{kind}")
            marked += len(ends)

    mappable = plt.cm.ScalarMappable(norm=plt.Normalize(low, high), cmap=cmap)
    fig.colorbar(mappable, ax=ax, label="verifier score", fraction=0.03)
    ax.set_xlabel("step")
    ax.set_yticks([])
    ax.set_xlim(-0.5, max(xs, default=0) + 0.5)
    chosen_answer = completions[chosen]["answer"] if chosen is not None else None
    ax.set_title(f"{record['id']}: {record['strategy']} n={record['n']}, {len(nodes)} steps; "
                 f"answer {chosen_answer!s}, reference {record.get('reference')!s}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return TreeDrawing(path=output, nodes=len(nodes), answers=marked, chosen_path=chosen_path)


def _grade(completion: dict) -> str:
    if "correct" not in completion:
        return "ungraded"
    return "correct" if completion["correct"] else "wrong"
