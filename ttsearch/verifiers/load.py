"""load_verifier: a verifier from a spec — "arithmetic", "self", or a PRM (path or model alias).

A PRM's family is read from the checkpoint, never from its name:
- config.json's architecture names a head: ``Qwen2ForProcessRewardModel`` -> "qwen-prm" (2-class
  head), ``Qwen2ForPrmModel`` -> "skywork" (value head);
- a causal LM whose tokenizer has a chat template -> "rlhflow" (steps as chat turns);
- any other causal LM -> "math-shepherd" (steps followed by a tag).
``family=`` overrides the choice (e.g. "math-shepherd" with ``tag=``/``good=``/``bad=`` turns any
causal LM into a token-probability PRM).

A PRM naming the policy's own model runs on the policy's engine; otherwise it gets its own
engine, built from the engine options among the overrides.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from ttsearch.engine.engine import Engine
from ttsearch.errors import ModelLoadError
from ttsearch.models.loader import load_head_weights, resolve_model_path
from ttsearch.verifiers.arithmetic import ArithmeticChecker
from ttsearch.verifiers.base import Verifier
from ttsearch.verifiers.formats import ChatTurnsFormat, LineStepFormat, SeparatorFormat, TaggedFormat
from ttsearch.verifiers.model import ModelPRM, Readout
from ttsearch.verifiers.self_verify import SelfVerifier

# family -> (format, the config head it reads: "lm" = two rows of the LM head)
FAMILIES = {
    "math-shepherd": (TaggedFormat, "lm"),
    "rlhflow": (ChatTurnsFormat, "lm"),
    "qwen-prm": (SeparatorFormat, "classifier"),
    "skywork": (LineStepFormat, "value"),
}
ENGINE_OPTIONS = ("dtype", "device", "block_size", "kv_cache_bytes", "max_model_len", "progress", "prefix_caching")


def detect_family(engine: Engine) -> str:
    head = engine.config.head
    if head == "classifier":
        return "qwen-prm"
    if head == "value":
        return "skywork"
    return "rlhflow" if engine.tokenizer.chat_template else "math-shepherd"


#: verifiers registered by name: name -> factory(policy_engine=..., aggregation=..., **options)
REGISTERED: dict[str, Callable[..., Verifier]] = {}


def register_verifier(name: str, factory: Callable[..., Verifier]) -> None:
    """Make ``load_verifier(name)`` (and ``--verifier name``) build a verifier of your own:
    ``factory(policy_engine=engine, aggregation=..., **options)`` returns a ``Verifier``."""
    if not (isinstance(name, str) and name) or name in ("arithmetic", "self"):
        raise ValueError(f"register_verifier: {name!r} is not a free verifier name")
    if not callable(factory):
        raise TypeError(f"register_verifier({name!r}): the factory must be callable")
    REGISTERED[name] = factory


def load_verifier(spec: str, policy_engine: Engine | None = None, aggregation: str = "last", **overrides) -> Verifier:
    """``spec``: "arithmetic" (option: neutral), "self" (the policy judges its steps; options:
    ask, candidates, suffix), a name given to ``register_verifier``, or a PRM's path or
    alias. A PRM's options: ``family``; its format's (math-shepherd: tag, good, bad; rlhflow:
    good, bad; qwen-prm: separator, system_prompt; skywork: step_token); and its engine's
    (dtype, device, block_size, kv_cache_bytes, max_model_len, progress, prefix_caching)."""
    if spec in REGISTERED:
        verifier = REGISTERED[spec](policy_engine=policy_engine, aggregation=aggregation, **overrides)
        if not isinstance(verifier, Verifier):
            raise TypeError(f"verifier {spec!r}: its factory returned {type(verifier).__name__}, not a Verifier")
        return verifier
    if spec == "arithmetic":
        return ArithmeticChecker(aggregation, **overrides)
    if spec == "self":
        if policy_engine is None:
            raise ValueError("load_verifier('self'): self-verification needs the policy_engine")
        return SelfVerifier(policy_engine, aggregation, **overrides)

    family = overrides.pop("family", None)
    engine_options = {k: overrides.pop(k) for k in ENGINE_OPTIONS if k in overrides}
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {sorted(FAMILIES)}")
    if policy_engine is not None and _same_model(spec, policy_engine):
        if engine_options:
            raise ValueError(f"{spec}: runs on the policy's engine, so {sorted(engine_options)} do not apply")
        engine = policy_engine
    else:
        engine = Engine(spec, **engine_options)
    family = family or detect_family(engine)
    format_cls, head = FAMILIES[family]
    try:
        step_format = format_cls(engine.tokenizer, **overrides)
    except ModelLoadError as e:
        raise ModelLoadError(f"{spec} ({family} format): {e}") from e
    if head == "lm":
        if engine.model.lm_head.shape[0] != engine.config.vocab_size:
            raise ModelLoadError(f"{spec}: family {family!r} reads the LM head; this {engine.config.head} PRM has none")
        readout = Readout.lm_rows(engine, *step_format.candidates)
    else:
        readout = Readout.from_head(engine, head, load_head_weights(spec, head))
    return ModelPRM(engine, step_format, readout, aggregation)


def _same_model(spec: str, engine: Engine) -> bool:
    """Whether ``spec`` names the model ``engine`` was loaded from (config.source is its
    config.json, or its GGUF file)."""
    source = pathlib.Path(engine.config.source).resolve()
    model = source.parent if source.name == "config.json" else source
    return resolve_model_path(spec).resolve() == model
