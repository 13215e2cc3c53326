"""Search settings, validated before any model loads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STRATEGIES = ("best_of_n", "beam_search", "dvts", "compute_optimal")
AGGREGATIONS = ("last", "min", "prod", "mean")

# The prompt asks for steps separated by blank lines and a boxed answer, as the PRMs'
# training data is formatted. It holds nothing that changes from day to day.
DEFAULT_SYSTEM_PROMPT = (
    "Solve the following math problem efficiently and clearly. Think step by step, "
    "separate the steps with a blank line, and end with: The answer is \\boxed{ANSWER}."
)


class ConfigError(ValueError):
    """A search setting with a bad value; the message names the setting."""


@dataclass(frozen=True)
class SearchConfig:
    strategy: str = "beam_search"
    n: int = 4  # samples (best_of_n) or live beams (beam_search, dvts), or the budget (compute_optimal)
    beam_width: int = 4  # M: children per surviving beam
    max_iterations: int = 40  # steps per path
    max_step_tokens: int = 256
    lookahead: int = 0  # beam_search: greedy steps rolled out before ranking
    aggregation: str = "last"  # how a path's step scores combine
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: str = "\n\n"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    example_question: str | None = None  # an optional worked example, shown as one earlier turn
    example_solution: str | None = None
    problems_in_flight: int = 4  # problems searched together in one batch
    pilot_samples: int = 4  # compute_optimal: samples that estimate difficulty
    optimal_table: str | None = None  # compute_optimal: the table `ttsearch fit` wrote

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        if self.strategy not in STRATEGIES:
            bad("strategy", f"expected one of {', '.join(STRATEGIES)}")
        for name in ("n", "beam_width", "max_iterations", "max_step_tokens", "problems_in_flight", "pilot_samples"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                bad(name, "must be a positive integer")
        if not (isinstance(self.lookahead, int) and self.lookahead >= 0):
            bad("lookahead", "must be an integer >= 0")
        if self.lookahead and self.strategy != "beam_search":
            bad("lookahead", "only beam_search rolls out lookahead steps")
        if self.strategy in ("beam_search", "dvts") and self.n % self.beam_width:
            raise ConfigError(
                f"n={self.n} is not a multiple of beam_width={self.beam_width} (strategy {self.strategy})"
            )
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"expected one of {', '.join(AGGREGATIONS)}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            bad("temperature", "must be >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", "must be an integer >= 0")
        if not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not self.stop:
            bad("stop", "must be a non-empty delimiter")
        if (self.example_question is None) != (self.example_solution is None):
            bad("example_solution" if self.example_solution is None else "example_question",
                "a worked example needs both example_question and example_solution")
        if self.strategy == "compute_optimal":
            if not self.optimal_table:
                bad("optimal_table", "compute_optimal needs the table written by `ttsearch fit`")
            if not Path(self.optimal_table).is_file():
                bad("optimal_table", "no such file")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def read_config_file(path: str | Path) -> dict:
    """Settings from a YAML or JSON file (a flat mapping of setting -> value)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return values
