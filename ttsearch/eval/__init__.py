"""Datasets, answer extraction and grading, and the bundled arithmetic problem set."""

from ttsearch.eval.arithmetic import bundled_arithmetic_path, generate_problems, write_jsonl
from ttsearch.eval.datasets import DatasetError, Problem, load_jsonl
from ttsearch.eval.grading import answer_key, extract_answer, grade, is_equivalent

__all__ = [
    "DatasetError",
    "Problem",
    "load_jsonl",
    "extract_answer",
    "is_equivalent",
    "grade",
    "answer_key",
    "generate_problems",
    "write_jsonl",
    "bundled_arithmetic_path",
]
