"""ModelConfig: the one description of a Llama-family decoder, parsed from HF config.json or GGUF metadata.

Everything the model code needs is resolved here (defaults, head_dim, RoPE scaling, EOS ids), and
everything ttsearch cannot run exactly is refused here, with the file, the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# Process reward models: a supported decoder read through a scoring head instead of the LM head
# (see loader.head_shapes). architecture name -> (decoder, head)
PRM_ARCHITECTURES = {
    "Qwen2ForProcessRewardModel": ("qwen2", "classifier"),  # Qwen2.5-Math-PRM
    "Qwen2ForPrmModel": ("qwen2", "value"),  # Skywork-o1-Open-PRM
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# llama.cpp writes the Llama 3 RoPE scaling as a tensor of per-frequency divisors, not as metadata;
# these are the parameters its converter assumes when the HF config does not override them.
_GGUF_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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


def _positive_int(value, field: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"{source}: field {field!r} must be a positive integer, got {value!r}")
    return value


def _positive_float(value, field: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ModelLoadError(f"{source}: field {field!r} must be a positive number, got {value!r}")
    return float(value)


def _optional_token_id(value, field: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"{source}: field {field!r} must be a token id (int >= 0), got {value!r}")
    return value


def _token_ids(value, field: str, source: str) -> tuple[int, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    ids = (_optional_token_id(v, field, source) for v in values)
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _check_consistency(config: ModelConfig, names: dict[str, str]) -> None:
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


def _rope_scaling(params: dict, field: str, source: str, default_original_max: int) -> dict | None:
    """Normalize a RoPE parameter dict (HF rope_scaling / rope_parameters) to ModelConfig.rope_scaling."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: field '{field}.rope_type' = {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return None

    def number(key):
        if key not in params:
            raise ModelLoadError(f"{source}: field '{field}.{key}' is required for rope_type {rope_type!r}")
        return _positive_float(params[key], f"{field}.{key}", source)

    factor = number("factor")
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": factor}
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if high <= low:
        raise ModelLoadError(
            f"{source}: field '{field}.high_freq_factor' = {high} must exceed '{field}.low_freq_factor' = {low}"
        )
    original = params.get("original_max_position_embeddings", default_original_max)
    original = _positive_int(original, f"{field}.original_max_position_embeddings", source)
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


# ---------------------------------------------------------------------------------------------
# HF config.json

_MISSING = object()


def _hf_architecture(d: dict, source: str) -> tuple[str, str]:
    """(decoder architecture, head) named by the config."""
    architectures = d.get("architectures")
    if architectures:
        name = architectures[0]
        if name in PRM_ARCHITECTURES:
            return PRM_ARCHITECTURES[name]
        if name not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{source}: field 'architectures' = {architectures!r} is not supported "
                f"(supported: {', '.join([*SUPPORTED_ARCHITECTURES, *PRM_ARCHITECTURES])})"
            )
        return SUPPORTED_ARCHITECTURES[name], "lm"
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise UnsupportedArchitectureError(
            f"{source}: neither field 'architectures' nor field 'model_type' (= {model_type!r}) names a "
            f"supported architecture (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return model_type, "lm"


def _refuse_unsupported_hf_features(d: dict, architecture: str, source: str) -> None:
    """Config switches that change the computation in ways the ttsearch decoder does not implement."""
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(
            f"{source}: field 'hidden_act' = {d['hidden_act']!r}; only 'silu' is supported"
        )
    if architecture == "llama":
        # Llama's attention_bias also puts a bias on o_proj, and mlp_bias on every MLP projection.
        for field in ("attention_bias", "mlp_bias"):
            if d.get(field, False):
                raise UnsupportedArchitectureError(
                    f"{source}: field {field!r} = {d[field]!r}; Llama checkpoints with this bias are not supported"
                )
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(
            f"{source}: field 'partial_rotary_factor' = {d['partial_rotary_factor']!r}; only 1.0 is supported"
        )


def _hf_max_positions(d: dict, architecture: str, source: str, max_positions: int) -> int:
    window = d.get("sliding_window")
    if architecture == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if architecture in ("mistral", "qwen2") and window is not None:
        # Sequences never grow past the sliding window, so full causal attention equals the model's
        # sliding-window attention and the decoder stays exact without implementing the window.
        max_positions = min(max_positions, _positive_int(window, "sliding_window", source))
    return max_positions


def config_from_hf(d: dict, source: str) -> ModelConfig:
    """Parse a HF config.json dict (transformers 4.x rope_theta/rope_scaling or 5.x rope_parameters)."""
    architecture, head = _hf_architecture(d, source)
    _refuse_unsupported_hf_features(d, architecture, source)

    def field(name, default=_MISSING):
        if name not in d and default is _MISSING:
            raise ModelLoadError(f"{source}: required field {name!r} is missing")
        return d.get(name, default)

    hidden_size = _positive_int(field("hidden_size"), "hidden_size", source)
    num_heads = _positive_int(field("num_attention_heads"), "num_attention_heads", source)
    num_kv_heads = _positive_int(field("num_key_value_heads", num_heads), "num_key_value_heads", source)
    head_dim = field("head_dim", None)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ModelLoadError(
                f"{source}: field 'hidden_size' = {hidden_size} is not a multiple of "
                f"field 'num_attention_heads' = {num_heads} (and there is no 'head_dim')"
            )
        head_dim = hidden_size // num_heads
    head_dim = _positive_int(head_dim, "head_dim", source)

    # as in transformers, a non-empty rope_scaling wins over rope_parameters
    rope_field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope_params = dict(d.get(rope_field) or {})
    rope_theta = _positive_float(
        rope_params.get("rope_theta", field("rope_theta", 10000.0)), f"{rope_field}.rope_theta", source
    )
    max_positions = _positive_int(field("max_position_embeddings"), "max_position_embeddings", source)
    # transformers lets a top-level original_max_position_embeddings override the one in the rope dict
    if "original_max_position_embeddings" in d:
        rope_params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    rope_scaling = _rope_scaling(rope_params, rope_field, source, max_positions)

    config = ModelConfig(
        architecture=architecture,
        vocab_size=_positive_int(field("vocab_size"), "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_positive_int(field("intermediate_size"), "intermediate_size", source),
        num_layers=_positive_int(field("num_hidden_layers"), "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float(field("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_hf_max_positions(d, architecture, source, max_positions),
        tie_word_embeddings=bool(field("tie_word_embeddings", False)),
        # Qwen2 configs carry no attention_bias field: its q/k/v projections always have one.
        attention_bias=architecture == "qwen2",
        bos_token_id=_optional_token_id(field("bos_token_id", None), "bos_token_id", source),
        eos_token_ids=_token_ids(field("eos_token_id", None), "eos_token_id", source),
        source=source,
        head=head,
    )
    _check_consistency(
        config,
        {
            "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads",
            "head_dim": "head_dim",
            "vocab_size": "vocab_size",
            "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id",
        },
    )
    return config


# ---------------------------------------------------------------------------------------------
# GGUF metadata

# llama.cpp writes Mistral checkpoints under "llama"; "mistral" is accepted for files that say so.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _gguf_value(reader, key: str, source: str, default=_MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ModelLoadError(f"{source}: required GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _gguf_rope_scaling(reader, arch: str, source: str, head_dim: int, rope_theta: float) -> dict | None:
    prefix = f"{arch}.rope.scaling"
    rope_type = _gguf_value(reader, f"{prefix}.type", source, "none")
    if rope_type == "none":
        return _gguf_llama3_from_freq_factors(reader, source, head_dim, rope_theta)
    if rope_type != "linear":
        raise UnsupportedArchitectureError(
            f"{source}: GGUF metadata key '{prefix}.type' = {rope_type!r} is not supported (supported: none, linear)"
        )
    factor = _gguf_value(reader, f"{prefix}.factor", source)
    return {"rope_type": "linear", "factor": _positive_float(factor, f"{prefix}.factor", source)}


def _gguf_llama3_from_freq_factors(reader, source: str, head_dim: int, rope_theta: float) -> dict | None:
    """Recover Llama 3 RoPE scaling from llama.cpp's rope_freqs tensor (its only record of it).

    The factor is the largest divisor; the other parameters are the converter's defaults, accepted only
    if they reproduce every stored divisor.
    """
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    stored = torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), **_GGUF_LLAMA3_DEFAULTS}
    implied = _inv_freq(head_dim, rope_theta, None) / _inv_freq(head_dim, rope_theta, scaling)
    if stored.shape != implied.shape or not torch.allclose(stored, implied, rtol=1e-4, atol=0):
        raise UnsupportedArchitectureError(
            f"{source}: tensor 'rope_freqs.weight' holds RoPE frequency factors that are not Llama 3 scaling "
            f"with {_GGUF_LLAMA3_DEFAULTS}; load the original HF checkpoint instead"
        )
    return scaling


def config_from_gguf(reader, source: str) -> ModelConfig:
    """Parse the metadata (and tensor list) of an opened gguf.GGUFReader."""
    arch = _gguf_value(reader, "general.architecture", source)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: GGUF metadata key 'general.architecture' = {arch!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )

    def value(suffix, default=_MISSING):
        return _gguf_value(reader, f"{arch}.{suffix}", source, default)

    hidden_size = _positive_int(value("embedding_length"), f"{arch}.embedding_length", source)
    num_heads = _positive_int(value("attention.head_count"), f"{arch}.attention.head_count", source)
    num_kv_heads = _positive_int(
        value("attention.head_count_kv", num_heads), f"{arch}.attention.head_count_kv", source
    )
    head_dim = _positive_int(
        value("attention.key_length", hidden_size // num_heads), f"{arch}.attention.key_length", source
    )
    rope_dim = value("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{source}: GGUF metadata key '{arch}.rope.dimension_count' = {rope_dim!r} differs from the head "
            f"dimension {head_dim}; partial rotary embeddings are not supported"
        )
    vocab_size = value("vocab_size", None)
    if vocab_size is None:
        vocab_size = len(_gguf_value(reader, "tokenizer.ggml.tokens", source))
    max_positions = _positive_int(value("context_length"), f"{arch}.context_length", source)
    rope_theta = _positive_float(value("rope.freq_base", 10000.0), f"{arch}.rope.freq_base", source)
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    eos_ids = tuple(
        dict.fromkeys(i for key in eos_keys for i in _token_ids(_gguf_value(reader, key, source, None), key, source))
    )
    bos_key = "tokenizer.ggml.bos_token_id"

    config = ModelConfig(
        architecture=arch,
        vocab_size=_positive_int(vocab_size, f"{arch}.vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=_positive_int(value("feed_forward_length"), f"{arch}.feed_forward_length", source),
        num_layers=_positive_int(value("block_count"), f"{arch}.block_count", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float(
            value("attention.layer_norm_rms_epsilon"), f"{arch}.attention.layer_norm_rms_epsilon", source
        ),
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(reader, arch, source, head_dim, rope_theta),
        max_position_embeddings=max_positions,
        # llama.cpp omits output.weight when the LM head is the embedding matrix
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        attention_bias=arch == "qwen2",
        bos_token_id=_optional_token_id(_gguf_value(reader, bos_key, source, None), bos_key, source),
        eos_token_ids=eos_ids,
        source=source,
    )
    _check_consistency(
        config,
        {
            "num_heads": f"{arch}.attention.head_count",
            "num_kv_heads": f"{arch}.attention.head_count_kv",
            "head_dim": f"{arch}.attention.key_length",
            "vocab_size": f"{arch}.vocab_size",
            "bos_token_id": bos_key,
            "eos_token_id": "tokenizer.ggml.eos_token_id",
        },
    )
    return config


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies, computed with the same ops (and so the same bits)
    as transformers.modeling_rope_utils for the default, linear and llama3 RoPE types."""
    return _inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


def _inv_freq(dim: int, rope_theta: float, scaling: dict | None) -> torch.Tensor:
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (rope_theta**exponent)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor

    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
