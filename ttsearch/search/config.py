"""Search settings, validated before any model loads, and search-and-learn recipes mapped to them."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ttsearch.aggregation import AGGREGATIONS
from ttsearch.engine.sampler import SamplingParams
from ttsearch.errors import ConfigError
from ttsearch.search.strategies import SEARCHES, STRATEGIES

RESAMPLINGS = ("multinomial", "systematic")
PARTICLE_WEIGHTS = ("logit", "reward")

# The prompt asks for steps separated by blank lines and a boxed answer, as the PRMs'
# training data is formatted. It holds nothing that changes from day to day.
DEFAULT_SYSTEM_PROMPT = (
    "Solve the following math problem efficiently and clearly. Think step by step, "
    "separate the steps with a blank line, and end with: The answer is \\boxed{ANSWER}."
)


@dataclass(frozen=True)
class SearchConfig:
    """One search's settings. The defaults follow search-and-learn (``src/sal/config.py``
    and ``src/sal/search/``); the options marked "ours" change its rules and are off."""

    strategy: str = "beam_search"
    n: int = 4  # samples (best_of_n) or live beams (beam_search, dvts), or the budget (compute_optimal)
    beam_width: int = 4  # M: beam search keeps n / M beams; a DVTS subtree writes M candidates
    max_iterations: int = 40  # beam search / DVTS: the last one writes to EOS (search-and-learn's num_iterations)
    max_tokens: int = 2048  # the last iteration's budget, a best-of-N sample's budget, and the step limit
    max_step_tokens: int | None = None  # a step's limit when it should differ from max_tokens
    lookahead: int = 0  # beam_search / dvts: greedy steps rolled out and scored before ranking
    aggregation: str = "last"  # how a path's step scores combine
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: str = "\n\n"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    chat_template: str | None = None  # replaces the policy tokenizer's template (a recipe's custom_chat_template)
    example_question: str | None = None  # an optional worked example, shown as one earlier turn
    example_solution: str | None = None
    sort_completed: bool = True  # beam search answers: the n best-scored completions (else the first n)
    filter_duplicates: bool = False  # beam search: of unfinished beams with the same text, rank only the first
    stop_at_n_finished: bool = False  # ours: beam search ends once it has n finished answers
    drop_length_cuts: bool = False  # ours: a path cut by a token limit is not an answer
    resampling: str = "multinomial"  # particle_filter: multinomial or systematic resampling
    particle_weights: str = "logit"  # particle_filter: a particle's log-weight is logit(reward) (as Puri et al.'s code) or the reward
    resample_temperature: float = 1.0  # particle_filter: particles are drawn by softmax(log-weight / T)
    balance_temperature: float = 0.2  # rebase: the width budget is shared by softmax(reward / T)
    stop_agree: int = 0  # ours: a problem stops once this many of its latest finished answers are equal (0: off)
    stop_share: float = 0.0  # ours: ... or once the leading answer holds this share of their summed scores (0: off)
    stop_window: int = 0  # ours: how many latest finished answers those rules read (0: stop_agree, at least 2)
    problems_in_flight: int = 16  # problems searched together in one batch
    pilot_samples: int = 4  # compute_optimal: samples that estimate difficulty
    optimal_table: str | None = None  # compute_optimal: the table `ttsearch fit` wrote

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        known = strategy_names()
        if self.strategy not in known:
            bad("strategy", f"expected one of {', '.join(known)}")
        for name in ("n", "beam_width", "max_iterations", "max_tokens", "problems_in_flight", "pilot_samples"):
            if not _positive_int(getattr(self, name)):
                bad(name, "must be a positive integer")
        if self.max_step_tokens is not None and not _positive_int(self.max_step_tokens):
            bad("max_step_tokens", "must be a positive integer (or unset: max_tokens)")
        if not (isinstance(self.lookahead, int) and not isinstance(self.lookahead, bool) and self.lookahead >= 0):
            bad("lookahead", "must be an integer >= 0")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"expected one of {', '.join(AGGREGATIONS)}")
        if problem := SamplingParams.out_of_range(self.temperature, self.top_p, self.top_k):
            bad(*problem)
        if not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not (isinstance(self.stop, str) and self.stop):
            bad("stop", "must be a non-empty delimiter")
        if self.resampling not in RESAMPLINGS:
            bad("resampling", f"expected one of {', '.join(RESAMPLINGS)}")
        if self.particle_weights not in PARTICLE_WEIGHTS:
            bad("particle_weights", f"expected one of {', '.join(PARTICLE_WEIGHTS)}")
        for name in ("resample_temperature", "balance_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                bad(name, "must be > 0")
        for name in ("stop_agree", "stop_window"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                bad(name, "must be an integer >= 0")
        if not (isinstance(self.stop_share, (int, float)) and not isinstance(self.stop_share, bool)
                and 0 <= self.stop_share <= 1):
            bad("stop_share", "must be in [0, 1] (0: off)")
        if self.stop_agree > self.agreement_window:
            bad("stop_agree", f"cannot exceed stop_window={self.stop_window}: it counts equal answers among them")
        for name in ("sort_completed", "filter_duplicates", "stop_at_n_finished", "drop_length_cuts"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if self.chat_template is not None and not (isinstance(self.chat_template, str) and self.chat_template):
            bad("chat_template", "must be a Jinja chat template string")
        if (self.example_question is None) != (self.example_solution is None):
            bad("example_solution" if self.example_solution is None else "example_question",
                "a worked example needs both example_question and example_solution")
        SEARCHES[self.strategy].check(self)  # what the strategy itself cannot run

    @property
    def step_tokens(self) -> int:
        """A step's token limit: ``max_step_tokens``, else ``max_tokens`` (as search-and-learn)."""
        return self.max_step_tokens or self.max_tokens

    @property
    def agreement_window(self) -> int:
        """The latest finished answers the early-stopping rules read."""
        return self.stop_window or max(self.stop_agree, 2)

    @property
    def stops_early(self) -> bool:
        return bool(self.stop_agree or self.stop_share)

    def rules(self) -> dict:
        """Which search rules ran, for the records: the strategy's source's (search-and-learn's
        for its three) unless an option of ours is on."""
        ours = {k: getattr(self, k) for k in ("stop_at_n_finished", "drop_length_cuts")}
        if self.stops_early:
            ours.update(stop_agree=self.stop_agree, stop_share=self.stop_share, stop_window=self.agreement_window)
        source = SEARCHES[self.strategy].source if self.strategy in STRATEGIES else "custom"
        return {"semantics": "modified" if any(ours.values()) else source, **ours,
                "sort_completed": self.sort_completed, "filter_duplicates": self.filter_duplicates}

    def sampling(self, seed: int) -> SamplingParams:
        """The sampling of a search's steps, on the random stream ``seed``."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def strategy_names() -> tuple[str, ...]:
    """The built-in strategies and any registered with ``register_strategy``."""
    return tuple(SEARCHES)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ----------------------------------------------------------------------------- search-and-learn recipes

#: search-and-learn's Config keys that are settings here under another name
RECIPE_RENAMES = {
    "approach": "strategy",
    "num_iterations": "max_iterations",
    "agg_strategy": "aggregation",
    "custom_chat_template": "chat_template",
}
#: its keys that say what to run rather than how to search: (ours, what it means here)
RECIPE_RUN_KEYS = {
    "model_path": "model",
    "prm_path": "verifier",
    "dataset_name": "dataset",
    "num_samples": "limit",
    "dataset_start": "start",
    "dataset_end": "end",
}
#: its keys with no meaning here, and why
RECIPE_IGNORED = {
    "prm_batch_size": "the verifier scores every ready step of every problem in one batch",
    "search_batch_size": "every problem in flight shares one decode batch (see problems_in_flight)",
    "gpu_memory_utilization": "the KV pool is sized by --kv-cache-gib",
    "output_dir": "results go to --output",
    "num_proc": "no dataset preprocessing workers here",
    "push_to_hub": "nothing is uploaded",
    "hub_dataset_id": "nothing is uploaded",
    "hub_dataset_private": "nothing is uploaded",
    "overwrite_hub_revision": "nothing is uploaded",
    "apply_voting": "every record holds naive, majority and weighted selection",
    "dataset_config": "datasets are local JSONL files",
    "dataset_split": "datasets are local JSONL files",
}
RUN_KEYS = ("model", "verifier", "dataset", "limit", "start", "end")


def split_settings(values: dict, source: str) -> tuple[dict, dict]:
    """A settings mapping (ours, search-and-learn's, or both) as ``(search settings, run
    settings)``. search-and-learn's keys are renamed to ours; its keys with no meaning here
    are named in one warning and dropped; unknown keys are an error."""
    search, run, ignored = {}, {}, []
    known = {f.name for f in fields(SearchConfig)}
    for key, value in values.items():
        if key in RECIPE_IGNORED:
            ignored.append(key)
            continue
        if key in RECIPE_RUN_KEYS or key in RUN_KEYS:
            target, into = RECIPE_RUN_KEYS.get(key, key), run
        elif key in RECIPE_RENAMES or key in known:
            target, into = RECIPE_RENAMES.get(key, key), search
        else:
            everything = sorted(known | set(RUN_KEYS) | set(RECIPE_RENAMES) | set(RECIPE_RUN_KEYS) | set(RECIPE_IGNORED))
            raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(everything)}")
        if target in into:
            raise ConfigError(f"{source}: {key!r} and another key both set {target!r}")
        into[target] = value
    if ignored:
        reasons = "; ".join(f"{k} ({RECIPE_IGNORED[k]})" for k in ignored)
        warnings.warn(f"{source}: ignored, no meaning in ttsearch: {reasons}", stacklevel=2)
    dataset = run.get("dataset")
    if dataset is not None and not Path(str(dataset)).is_file():
        warnings.warn(f"{source}: dataset_name={dataset!r} is not a local JSONL file and ttsearch downloads "
                      "nothing: ignored, pass --dataset", stacklevel=2)
        del run["dataset"]
    for name in ("limit", "start", "end"):
        if run.get(name) is not None and not (isinstance(run[name], int) and not isinstance(run[name], bool)
                                              and run[name] >= 0):
            raise ConfigError(f"{source}: {name}={run[name]!r}: must be an integer >= 0")
    return search, run


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
