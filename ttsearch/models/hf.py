"""A HF model directory: config.json (and generation_config.json), safetensors weights, tokenizer."""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError
from ttsearch.models.checkpoint import Checkpoint, check_shapes, expected_shapes, head_shapes
from ttsearch.models.config import (MISSING, PRM_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelConfig, check_consistency,
                                    distinct_token_ids, optional_token_id, positive_float, positive_int)
from ttsearch.models.rope import rope_scaling_from

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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
        max_positions = min(max_positions, positive_int(window, "sliding_window", source))
    return max_positions


def config_from_hf(d: dict, source: str) -> ModelConfig:
    """Parse a HF config.json dict (transformers 4.x rope_theta/rope_scaling or 5.x rope_parameters)."""
    architecture, head = _hf_architecture(d, source)
    _refuse_unsupported_hf_features(d, architecture, source)

    def field(name, default=MISSING):
        if name not in d and default is MISSING:
            raise ModelLoadError(f"{source}: required field {name!r} is missing")
        return d.get(name, default)

    hidden_size = positive_int(field("hidden_size"), "hidden_size", source)
    num_heads = positive_int(field("num_attention_heads"), "num_attention_heads", source)
    num_kv_heads = positive_int(field("num_key_value_heads", num_heads), "num_key_value_heads", source)
    head_dim = field("head_dim", None)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ModelLoadError(
                f"{source}: field 'hidden_size' = {hidden_size} is not a multiple of "
                f"field 'num_attention_heads' = {num_heads} (and there is no 'head_dim')"
            )
        head_dim = hidden_size // num_heads
    head_dim = positive_int(head_dim, "head_dim", source)

    # as in transformers, a non-empty rope_scaling wins over rope_parameters
    rope_field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope_params = dict(d.get(rope_field) or {})
    rope_theta = positive_float(
        rope_params.get("rope_theta", field("rope_theta", 10000.0)), f"{rope_field}.rope_theta", source
    )
    max_positions = positive_int(field("max_position_embeddings"), "max_position_embeddings", source)
    # transformers lets a top-level original_max_position_embeddings override the one in the rope dict
    if "original_max_position_embeddings" in d:
        rope_params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    rope_scaling = rope_scaling_from(rope_params, rope_field, source, max_positions)

    config = ModelConfig(
        architecture=architecture,
        vocab_size=positive_int(field("vocab_size"), "vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=positive_int(field("intermediate_size"), "intermediate_size", source),
        num_layers=positive_int(field("num_hidden_layers"), "num_hidden_layers", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_float(field("rms_norm_eps", 1e-6), "rms_norm_eps", source),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=_hf_max_positions(d, architecture, source, max_positions),
        tie_word_embeddings=bool(field("tie_word_embeddings", False)),
        # Qwen2 configs carry no attention_bias field: its q/k/v projections always have one.
        attention_bias=architecture == "qwen2",
        bos_token_id=optional_token_id(field("bos_token_id", None), "bos_token_id", source),
        eos_token_ids=distinct_token_ids(field("eos_token_id", None), "eos_token_id", source),
        source=source,
        head=head,
    )
    check_consistency(
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


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def hf_config(directory: pathlib.Path) -> ModelConfig:
    config_path = directory / "config.json"
    config = config_from_hf(_read_json(config_path), str(config_path))
    # Instruct models often list extra end-of-turn ids only in generation_config.json.
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        generation = _read_json(generation_path)
        extra = generation.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        ids = [i for i in extra if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size]
        config = replace(config, eos_token_ids=tuple(dict.fromkeys((*config.eos_token_ids, *ids))))
    return config


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    single, index = directory / _SAFETENSORS, directory / _SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has neither {_SAFETENSORS!r} nor {_SAFETENSORS_INDEX!r}")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: field 'weight_map' must be a non-empty object, got {weight_map!r}")
    shards = [directory / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {str(shard)!r} listed in {str(index)!r} not found")
    return shards


def read_safetensors(files: list[pathlib.Path], wanted: set[str], progress: bool):
    from safetensors import SafetensorError, safe_open

    weights, weight_files = {}, {}
    with tqdm(total=len(wanted), desc="Loading tensors", unit="tensor", disable=not progress) as bar:
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        if name in wanted:
                            weights[name] = f.get_tensor(name).to(torch.float32)
                            weight_files[name] = str(file)
                            bar.update()
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e
    return weights, weight_files


def _hf_tokenizer(directory: pathlib.Path):
    from transformers import AutoTokenizer

    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"{str(directory)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory}: cannot load the tokenizer ({e})") from e


def load_hf(directory: pathlib.Path, progress: bool) -> tuple[Checkpoint, list[str]]:
    config = hf_config(directory)
    files = safetensors_files(directory)
    weights, weight_files = read_safetensors(files, set(expected_shapes(config)), progress)
    tokenizer = _hf_tokenizer(directory)
    checkpoint = Checkpoint(config, weights, tokenizer, directory, weight_files)
    return checkpoint, [str(f) for f in files]


def load_head_weights(path: pathlib.Path, head: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of a PRM ``head`` ("classifier" | "value") in the HF directory
    ``path``, read without the decoder (the engine keeps only what the decoder needs)."""
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r}: a {head} PRM head is read from a HF model directory")
    config = hf_config(path)
    shapes = head_shapes(head, config.hidden_size)
    files = safetensors_files(path)
    weights, weight_files = read_safetensors(files, set(shapes), progress=False)
    check_shapes(shapes, weights, weight_files, config.source, [str(f) for f in files])
    return weights
