"""Datasets, answer extraction and grading (hand-made cases and the real MATH-500 and GSM8K
files), and the bundled arithmetic set with its generator."""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from pathlib import Path

import pytest

from ttsearch.eval import (
    DatasetError,
    Problem,
    answer_key,
    bundled_arithmetic_path,
    extract_answer,
    generate_problems,
    grade,
    is_equivalent,
    load_jsonl,
    write_jsonl,
)

# The repository is checked out beside the project's shared/ folder (../shared from the root).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} (the project's shared data) is absent")


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{1} and at last \\fbox{7}", "7"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed {42}", "42"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("\\boxed{3} ... \\boxed{12", None),  # cut off inside the last box: no answer
        ("\\boxed{}", None),
        ("Step 1: 12 * 7 = 84.\n\nStep 2: 84 + 5 = 89.\n\nThe answer is 89.", "89"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Answer: 3.5.", "3.5"),
        ("**Answer:** 7", "7"),
        ("the answer is \\(5\\)", "5"),
        ("The answer is 4. Checking again... Answer: 6", "6"),
        ("16 - 3 - 4 = 9\n#### 18", "18"),
        ("I don't know.", None),
        ("The answer is", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "a, b",
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac12", "1/2"),
        ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}"),
        ("90", "90^\\circ"),
        ("C", "\\text{(C)}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("5", "x=5"),
        ("-2, 1", "1,-2"),
        ("10080", "10,\\!080"),
        ("18.9", "\\$18.90"),
        ("3.0", "3"),
        ("2^{10}", "1024"),
        ("(x+1)^2", "x^2+2x+1"),
        ("\\left[ 1, 2 \\right]", "[1,2]"),
    ],
)
def test_equivalent_answers_written_differently(a, b):
    assert is_equivalent(a, b)
    assert grade(f"... so the result is $\\boxed{{{a}}}$.", b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("2", "3"),
        ("-3", "3"),
        ("0.33", "\\frac{1}{3}"),
        ("\\frac{\\pi}{2}", "90^\\circ"),
        ("(1,2)", "[1,2]"),
        ("(1,2)", "(2,1)"),
        ("C", "D"),
        ("\\text{yes}", "\\text{no}"),
        ("", ""),
    ],
)
def test_different_answers(a, b):
    assert not is_equivalent(a, b)


def test_grade_needs_an_answer():
    assert not grade("I think it is about five or so", "5")
    assert grade("The answer is 89.", "89")
    assert not grade("The answer is 88.", "89")


def test_is_equivalent_never_raises():
    for a, b in [(None, "1"), ("1", None), ("\\frac{", "}"), ("}}}{{{", "\\boxed{"), ("\\sqrt", "\\int")]:
        assert is_equivalent(a, b) is False


def test_pathological_answer_times_out_in_main_thread():
    start = time.monotonic()
    assert not is_equivalent("10^{10^{10}}", "1")
    assert time.monotonic() - start < 15


def test_grading_works_off_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            (is_equivalent("0.5", "\\frac{1}{2}"), grade("\\boxed{\\dfrac12}", "0.5"), answer_key("\\frac12"))
        )
    )
    worker.start()
    worker.join()
    assert results == [(True, True, "0.5")]


def test_answer_key_groups_equivalent_answers():
    groups = [
        ["0.5", "\\frac{1}{2}", "\\dfrac12", ".5", "$\\frac{1}{2}$"],
        ["1024", "2^{10}", "1,024", "1024.0"],
        ["90", "90^\\circ"],
        ["5", "x=5", "x = 5"],
        ["c", "C", "\\text{(C)}"],
        ["evelyn", "Evelyn", "\\text{Evelyn}"],
        ["{-2, 1}", "1,-2", "-2, 1"],
        ["0.707106781187", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"],
    ]
    for group in groups:
        assert {answer_key(a) for a in group} == {group[0]}, group
    assert len({answer_key(group[0]) for group in groups}) == len(groups)
    assert answer_key("123456789012345") != answer_key("123456789012346")  # integers stay exact


# ---------------------------------------------------------------------------- MATH-500


@pytest.fixture(scope="module")
def math500():
    path = SHARED_DATA / "math500.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, load_jsonl(path)


@needs_shared
def test_math500_loads(math500):
    rows, problems = math500
    assert len(problems) == 500
    first = problems[0]
    assert first.id == "test/precalculus/807.json" and first.level == "2" and first.subject == "Precalculus"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert [p.answer for p in problems] == [r["answer"] for r in rows]


@needs_shared
def test_math500_boxed_answer_of_each_solution_equals_its_answer(math500):
    rows, _ = math500
    wrong = [r["unique_id"] for r in rows if not grade(r["solution"], r["answer"])]
    assert wrong == []
    # Each last box holds the answer field character for character, so the above is decided
    # on text; boxing the answer once more sends every one through math-verify instead.
    unparsed = [r["unique_id"] for r in rows if not is_equivalent(f"\\boxed{{{r['answer']}}}", r["answer"])]
    assert unparsed == []


@needs_shared
def test_math500_answers_with_the_same_key_are_equivalent(math500):
    """Differently written answers of different problems that share a key (``90^\\circ`` and
    ``90``, ``x=5`` and ``5``, ``\\frac14`` and ``\\frac{1}{4}``) must also be judged equal."""
    rows, _ = math500
    by_key: dict[str, set[str]] = {}
    for r in rows:
        by_key.setdefault(answer_key(r["answer"]), set()).add(r["answer"])
    pairs = [(a, b) for forms in by_key.values() for a in forms for b in forms if a != b]
    assert len(pairs) >= 10
    assert [p for p in pairs if not is_equivalent(*p)] == []


@needs_shared
def test_math500_no_answer_equals_a_different_answer_of_another_problem(math500):
    rows, _ = math500
    answers = [r["answer"] for r in rows]
    pairs = [
        (a, b)
        for a, b in zip(answers, answers[1:] + answers[:1])
        if a != b and answer_key(a) != answer_key(b)
    ]
    assert len(pairs) > 450
    assert [p for p in pairs if is_equivalent(*p) or is_equivalent(p[1], p[0])] == []


# ---------------------------------------------------------------------------- GSM8K


@needs_shared
def test_gsm8k_file_loads_with_final_answers():
    problems = load_jsonl(SHARED_DATA / "gsm8k_test.jsonl")
    assert len(problems) == 1319
    assert problems[0].id == "gsm8k-1" and problems[0].answer == "18"
    assert problems[0].question.startswith("Janet")
    assert all(p.answer.lstrip("-").isdigit() for p in problems)  # "2,125" became "2125"
    assert "2125" in {p.answer for p in problems}


def test_gsm8k_answers_parsed(tmp_path):
    path = write_lines(
        tmp_path / "gsm.jsonl",
        json.dumps({"question": "How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}),
        "",
        json.dumps({"question": "How much?", "answer": "It costs 1,000 + 250.\n#### 1,250"}),
        json.dumps({"question": "Colder?", "answer": "#### -3"}),
    )
    problems = load_jsonl(path)
    assert [(p.id, p.answer) for p in problems] == [("gsm8k-1", "5"), ("gsm8k-3", "1250"), ("gsm8k-4", "-3")]
    assert grade("The answer is 1,250.", problems[1].answer)


def test_gsm8k_answer_without_final_marker(tmp_path):
    path = write_lines(tmp_path / "gsm.jsonl", json.dumps({"question": "q", "answer": "no final line"}))
    with pytest.raises(DatasetError, match=r"gsm\.jsonl:1: field 'answer' has no final answer after '####'"):
        load_jsonl(path)


# ---------------------------------------------------------------------------- malformed files

GOOD = json.dumps({"problem": "1+1?", "answer": "2", "level": 1, "subject": "Arithmetic", "unique_id": "a"})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"problem": "2+2?", "answer": ', r":3: invalid JSON: Expecting value at column 31"),
        ('["problem", "answer"]', r":3: expected a JSON object, got list"),
        ('{"problem": "2+2?", "unique_id": "b"}', r":3: missing field 'answer'"),
        ('{"problem": "2+2?", "answer": "  ", "unique_id": "b"}', r":3: field 'answer' is empty"),
        ('{"problem": "2+2?", "answer": null, "unique_id": "b"}', r":3: field 'answer' must be a string or number"),
        ('{"problem": "2+2?", "answer": "4", "unique_id": ""}', r":3: field 'unique_id' is empty"),
    ],
)
def test_malformed_line_reported_with_its_number(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "math.jsonl", GOOD, "", bad_line)  # line 2 is blank
    with pytest.raises(DatasetError, match=re.escape(str(path)) + message):
        load_jsonl(path)


def test_math500_lines_without_unique_id_get_ids_from_line_numbers(tmp_path):
    line = json.dumps({"problem": "2+2?", "answer": "4"})
    path = write_lines(tmp_path / "math.jsonl", line, "", line, GOOD)
    assert [p.id for p in load_jsonl(path)] == ["math-1", "math-3", "a"]
    mapped = write_lines(tmp_path / "mapped.jsonl", json.dumps({"prompt": "2+2?", "target": "4"}))
    with pytest.raises(DatasetError, match="missing field 'key'"):  # an id the caller's mapping names is required
        load_jsonl(mapped, fields={"question": "prompt", "answer": "target", "id": "key"})


def test_limit_stops_before_later_lines(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", GOOD, "not json")
    assert load_jsonl(path, limit=1) == [Problem("a", "1+1?", "2", level="1", subject="Arithmetic")]


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", GOOD, GOOD.replace('"a"', '"b"'), GOOD)
    with pytest.raises(DatasetError, match=r"math\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        load_jsonl(path)


def test_unknown_format_names_its_keys_and_the_known_formats(tmp_path):
    path = write_lines(tmp_path / "other.jsonl", json.dumps({"prompt": "2+2?", "target": "4"}))
    with pytest.raises(DatasetError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert "other.jsonl:1: unknown dataset format, keys ['prompt', 'target']" in message
    assert "math500 (answer, problem)" in message and "gsm8k (answer, question)" in message
    assert "field mapping" in message


def test_unreadable_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DatasetError, match=f"cannot read dataset {missing}: No such file"):
        load_jsonl(missing)


# ---------------------------------------------------------------------------- field mapping


def test_field_mapping(tmp_path):
    path = write_lines(
        tmp_path / "custom.jsonl",
        json.dumps({"key": "k1", "prompt": "What is 2+2?", "target": 4, "hardness": "easy"}),
        json.dumps({"key": "k2", "prompt": "What is 3*3?", "target": "9"}),
    )
    problems = load_jsonl(path, fields={"question": "prompt", "answer": "target", "id": "key", "level": "hardness"})
    assert problems == [
        Problem("k1", "What is 2+2?", "4", level="easy"),
        Problem("k2", "What is 3*3?", "9"),
    ]
    without_ids = load_jsonl(path, fields={"question": "prompt", "answer": "target"})
    assert [p.id for p in without_ids] == ["custom-1", "custom-2"]


def test_field_mapping_errors(tmp_path):
    path = write_lines(tmp_path / "custom.jsonl", json.dumps({"prompt": "q", "target": "a"}))
    with pytest.raises(DatasetError, match=r"custom\.jsonl: field mapping lacks \['answer'\]"):
        load_jsonl(path, fields={"question": "prompt"})
    with pytest.raises(DatasetError, match=r"unknown Problem fields \['solution'\]"):
        load_jsonl(path, fields={"question": "prompt", "answer": "target", "solution": "x"})
    with pytest.raises(DatasetError, match=r"custom\.jsonl:1: missing field 'key'"):
        load_jsonl(path, fields={"question": "prompt", "answer": "target", "id": "key"})


# ---------------------------------------------------------------------------- arithmetic set


def evaluate(expression: str) -> float:
    """An arithmetic expression of integers, + - * / and parentheses, evaluated by Python."""
    tree = ast.parse(expression, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    assert all(isinstance(node, allowed) for node in ast.walk(tree)), expression
    return eval(compile(tree, "<question>", "eval"))


def test_generator_is_deterministic_and_answers_are_exact():
    problems = generate_problems(300, seed=7)
    assert problems == generate_problems(300, seed=7)
    assert problems != generate_problems(300, seed=8)
    assert {p.level for p in problems} == {"1", "2", "3"}
    assert len({p.id for p in problems}) == 300
    expressions = 0
    for p in problems:
        assert p.answer.isdigit(), p  # a non-negative integer
        if p.question.startswith("What is "):
            assert evaluate(p.question.removeprefix("What is ").removesuffix("?")) == int(p.answer), p
            expressions += 1
    assert 100 < expressions < 300  # both expressions and word problems


def test_bundled_set_is_reproduced_byte_for_byte(tmp_path):
    regenerated = tmp_path / "arithmetic.jsonl"
    write_jsonl(generate_problems(100, seed=0), regenerated)
    assert regenerated.read_bytes() == bundled_arithmetic_path().read_bytes()


def test_bundled_set_loads():
    problems = load_jsonl(bundled_arithmetic_path())
    assert problems == generate_problems(100, seed=0)
    assert problems[0].id == "arith-0000" and problems[0].level == "1"
