"""ModelConfig: the one description of a Llama-family decoder, whichever format it came from.

Everything the model code needs is resolved when a config is built (defaults, head_dim, RoPE
scaling, EOS ids), and everything ttsearch cannot run exactly is refused then, with the file,
the field and the value: ``ttsearch.models.hf.config_from_hf`` parses a HF config.json,
``ttsearch.models.gguf.config_from_gguf`` GGUF metadata, both with the value checks here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttsearch.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# Process reward models: a supported decoder read through a scoring head instead of the LM head
# (see checkpoint.head_shapes). architecture name -> (decoder, head)
PRM_ARCHITECTURES = {
    "Qwen2ForProcessRewardModel": ("qwen2", "classifier"),  # Qwen2.5-Math-PRM
    "Qwen2ForPrmModel": ("qwen2", "value"),  # Skywork-o1-Open-PRM
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    source: str
    head: str = "lm"  # "lm" (causal LM), or a PRM head: "classifier" | "value"


# ---------------------------------------------------------------------------------------------
# value checks shared by both formats (`field` is the name in the source format)


def positive_int(value, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
    return value


def positive_float(value, field: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ModelLoadError(f"{source}: field {field!r} must be a positive number, got {value!r}")
    return float(value)


def optional_token_id(value, field: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{source}: field {field!r} must be a token id (int >= 0), got {value!r}")
    return value


def distinct_token_ids(value, field: str, source: str) -> tuple[int, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    ids = (optional_token_id(v, field, source) for v in values)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def check_consistency(config: ModelConfig, names: dict[str, str]) -> None:
    """Cross-field consistency; `names` maps ModelConfig fields to the source's field names."""
    src = config.source
    if config.num_heads % config.num_kv_heads:
        raise ModelLoadError(
            f"{src}: field {names['num_heads']!r} = {config.num_heads} is not a multiple of "
            f"field {names['num_kv_heads']!r} = {config.num_kv_heads}"
        )
    if config.head_dim % 2:
        raise ModelLoadError(f"{src}: field {names['head_dim']!r} = {config.head_dim} must be even for RoPE")
    token_ids = [("bos_token_id", config.bos_token_id)] + [("eos_token_id", i) for i in config.eos_token_ids]
    for token_field, token_id in token_ids:
        if token_id is not None and token_id >= config.vocab_size:
            raise ModelLoadError(
                f"{src}: field {names[token_field]!r} = {token_id} is outside the vocabulary "
                f"({names['vocab_size']!r} = {config.vocab_size})"
            )


#: a required field: the default of an optional one is anything else
MISSING = object()
