"""RoPE: the scaling types the decoder runs, their normalized parameters, the inverse frequencies."""

from __future__ import annotations

import math

import torch

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError
from ttsearch.models.config import ModelConfig, positive_float, positive_int

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


def rope_scaling_from(params: dict, field: str, source: str, default_original_max: int) -> dict | None:
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
        return positive_float(params[key], f"{field}.{key}", source)

    factor = number("factor")
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": factor}
    low, high = number("low_freq_factor"), number("high_freq_factor")
    if high <= low:
        raise ModelLoadError(
            f"{source}: field '{field}.high_freq_factor' = {high} must exceed '{field}.low_freq_factor' = {low}"
        )
    original = params.get("original_max_position_embeddings", default_original_max)
    original = positive_int(original, f"{field}.original_max_position_embeddings", source)
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """float32 [head_dim // 2] inverse frequencies, computed with the same ops (and so the same bits)
    as transformers.modeling_rope_utils for the default, linear and llama3 RoPE types."""
    return inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)


def inverse_frequencies(dim: int, rope_theta: float, scaling: dict | None) -> torch.Tensor:
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
