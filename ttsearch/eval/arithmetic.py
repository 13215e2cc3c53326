"""Multi-step arithmetic problems small enough for a 135M model to solve sometimes, which is
where search shows its worth: the demo and tests run on the bundled set generated here.

Level 1: two operations on small numbers, no parentheses. Level 2: two operations with
parentheses, or a two-step word problem. Level 3: three operations, or a three-step word
problem; division appears only where it is exact. Every answer is a non-negative integer
computed exactly while the problem is built.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from importlib.resources import files
from pathlib import Path

from ttsearch.eval.datasets import Problem

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mia", "Noah"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "cards", "beads"]

Template = Callable[[random.Random], tuple[str, int]]


def _product_plus(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 30)
    return f"What is {a} * {b} + {c}?", a * b + c


def _add_then_subtract(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(10, 60), rng.randint(5, 40)
    c = rng.randint(1, a + b)
    return f"What is {a} + {b} - {c}?", a + b - c


def _product_minus(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    return f"What is {a} * {b} - {c}?", a * b - c


def _buy_and_give(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b)
    question = f"{name} has {a} {item}, gets {b} more, and then gives away {c}. How many {item} does {name} have now?"
    return question, a + b - c


def _group_sum_times(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    return f"What is ({a} + {b}) * {c}?", (a + b) * c


def _times_difference(rng: random.Random) -> tuple[str, int]:
    b = rng.randint(5, 25)
    a, c = rng.randint(2, 9), rng.randint(1, b - 1)
    return f"What is {a} * ({b} - {c})?", a * (b - c)


def _boxes_plus_loose(rng: random.Random) -> tuple[str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 12), rng.randint(2, 9), rng.randint(1, 15)
    question = (
        f"A pack holds {a} {item}. {name} buys {b} packs and already had {c} {item}. "
        f"How many {item} does {name} have in total?"
    )
    return question, a * b + c


def _share_equally(rng: random.Random) -> tuple[str, int]:
    item = rng.choice(ITEMS)
    friends, each = rng.randint(2, 6), rng.randint(2, 12)
    per_bag = rng.choice([d for d in range(2, 13) if (friends * each) % d == 0])
    bags = friends * each // per_bag
    question = (
        f"{friends} friends share {bags} bags of {per_bag} {item} equally. How many {item} does each friend get?"
    )
    return question, each


def _two_products(rng: random.Random) -> tuple[str, int]:
    a, b, c, d = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 9), rng.randint(2, 12)
    return f"What is {a} * {b} + {c} * {d}?", a * b + c * d


def _grouped_then_subtract(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 6)
    d = rng.randint(1, (a + b) * c)
    return f"What is ({a} + {b}) * {c} - {d}?", (a + b) * c - d


def _exact_division(rng: random.Random) -> tuple[str, int]:
    a, b, d = rng.randint(2, 9), rng.randint(3, 12), rng.randint(2, 5)
    c = a * b % d or d  # a * b - c is then a positive multiple of d
    return f"What is ({a} * {b} - {c}) / {d}?", (a * b - c) // d


def _shopping(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(NAMES)
    pen, book = rng.randint(1, 5), rng.randint(2, 9)
    pens, books = rng.randint(2, 9), rng.randint(1, 6)
    question = (
        f"Pens cost {pen} dollars each and notebooks cost {book} dollars each. {name} buys {pens} pens "
        f"and {books} notebooks. How many dollars does {name} spend?"
    )
    return question, pen * pens + book * books


def _bake_and_pack(rng: random.Random) -> tuple[str, int]:
    name = rng.choice(NAMES)
    per_bag, bags = rng.randint(2, 6), rng.randint(2, 12)
    trays = rng.randint(2, 6)
    per_tray = rng.randint((per_bag * bags) // trays + 1, (per_bag * bags) // trays + 12)
    sold = trays * per_tray - per_bag * bags
    question = (
        f"{name} bakes {trays} trays of {per_tray} cookies, sells {sold} cookies, and packs the rest "
        f"into bags of {per_bag}. How many bags does {name} fill?"
    )
    return question, bags


TEMPLATES: dict[str, list[Template]] = {
    "1": [_product_plus, _add_then_subtract, _product_minus, _buy_and_give],
    "2": [_group_sum_times, _times_difference, _boxes_plus_loose, _share_equally],
    "3": [_two_products, _grouped_then_subtract, _exact_division, _shopping, _bake_and_pack],
}


def generate_problems(n: int, seed: int) -> list[Problem]:
    """``n`` problems, the same for the same seed on any machine; levels cycle 1, 2, 3."""
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        level = str(i % 3 + 1)
        question, answer = rng.choice(TEMPLATES[level])(rng)
        problems.append(Problem(id=f"arith-{i:04d}", question=question, answer=str(answer), level=level))
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    """One problem a line in ttsearch's own format (id, question, answer, level, subject; unset
    fields left out), which ``load_jsonl`` reads back."""
    lines = []
    for p in problems:
        record = {"id": p.id, "question": p.question, "answer": p.answer, "level": p.level, "subject": p.subject}
        lines.append(json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False) + "\n")
    Path(path).write_text("".join(lines), encoding="utf-8", newline="\n")


def bundled_arithmetic_path() -> Path:
    """The bundled set: 100 problems from ``generate_problems(100, seed=0)``."""
    return Path(str(files("ttsearch.eval") / "data" / "arithmetic.jsonl"))
