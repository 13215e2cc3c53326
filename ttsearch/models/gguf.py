"""A GGUF file (llama.cpp's format): metadata, tensors (dequantized, or kept in their blocks), tokenizer."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import torch
from tqdm.auto import tqdm

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError
from ttsearch.models.checkpoint import Checkpoint, expected_shapes
from ttsearch.models.config import (MISSING, ModelConfig, check_consistency, distinct_token_ids, optional_token_id,
                                    positive_float, positive_int)
from ttsearch.models.rope import inverse_frequencies
from ttsearch.ops.quantized import QuantizedTensor

# llama.cpp writes Mistral checkpoints under "llama"; "mistral" is accepted for files that say so.
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

# llama.cpp writes the Llama 3 RoPE scaling as a tensor of per-frequency divisors, not as metadata;
# these are the parameters its converter assumes when the HF config does not override them.
_GGUF_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _gguf_value(reader, key: str, source: str, default=MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is MISSING:
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
    return {"rope_type": "linear", "factor": positive_float(factor, f"{prefix}.factor", source)}


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
    implied = inverse_frequencies(head_dim, rope_theta, None) / inverse_frequencies(head_dim, rope_theta, scaling)
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

    def value(suffix, default=MISSING):
        return _gguf_value(reader, f"{arch}.{suffix}", source, default)

    hidden_size = positive_int(value("embedding_length"), f"{arch}.embedding_length", source)
    num_heads = positive_int(value("attention.head_count"), f"{arch}.attention.head_count", source)
    num_kv_heads = positive_int(
        value("attention.head_count_kv", num_heads), f"{arch}.attention.head_count_kv", source
    )
    head_dim = positive_int(
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
    max_positions = positive_int(value("context_length"), f"{arch}.context_length", source)
    rope_theta = positive_float(value("rope.freq_base", 10000.0), f"{arch}.rope.freq_base", source)
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    eos_ids = tuple(
        dict.fromkeys(
            i for key in eos_keys for i in distinct_token_ids(_gguf_value(reader, key, source, None), key, source)
        )
    )
    bos_key = "tokenizer.ggml.bos_token_id"

    config = ModelConfig(
        architecture=arch,
        vocab_size=positive_int(vocab_size, f"{arch}.vocab_size", source),
        hidden_size=hidden_size,
        intermediate_size=positive_int(value("feed_forward_length"), f"{arch}.feed_forward_length", source),
        num_layers=positive_int(value("block_count"), f"{arch}.block_count", source),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=positive_float(
            value("attention.layer_norm_rms_epsilon"), f"{arch}.attention.layer_norm_rms_epsilon", source
        ),
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(reader, arch, source, head_dim, rope_theta),
        max_position_embeddings=max_positions,
        # llama.cpp omits output.weight when the LM head is the embedding matrix
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        attention_bias=arch == "qwen2",
        bos_token_id=optional_token_id(_gguf_value(reader, bos_key, source, None), bos_key, source),
        eos_token_ids=eos_ids,
        source=source,
    )
    check_consistency(
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


_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _canonical_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> canonical HF name, or None for tensors the decoder does not use."""
    match = _GGUF_LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        hf = _GGUF_LAYER_NAMES.get(part)
        return f"model.layers.{layer}.{hf}.{kind}" if hf else None
    stem, _, kind = gguf_name.rpartition(".")
    hf = _GGUF_GLOBAL_NAMES.get(stem)
    return f"{hf}.{kind}" if hf else None


def _unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time reordering of q/k rows (interleaved -> half-split RoPE pairs),
    with the same math as transformers' GGUF loader (LlamaTensorProcessor._reverse_permute_weights)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


#: GGUF's names of the formats whose blocks the ops multiply directly
_PACKED_FORMATS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q4_K": "q4_K",
                   "Q6_K": "q6_K"}


def _open_gguf(path: pathlib.Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises assorted ValueError/struct/numpy errors on a bad file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _read_gguf_tensors(reader, config: ModelConfig, path: pathlib.Path, progress: bool, packed: bool):
    from gguf.quants import dequantize

    wanted = expected_shapes(config)
    # llama.cpp permutes q/k rows for the llama architecture (Mistral included), not for qwen2
    permute = config.architecture in ("llama", "mistral")
    weights, weight_files = {}, {}
    for tensor in tqdm(reader.tensors, desc="Reading GGUF tensors", unit="tensor", disable=not progress):
        name = _canonical_name(tensor.name)
        if name is None:
            continue
        if name not in wanted:
            if name.endswith(".bias"):
                # a bias the decoder would silently drop: refuse rather than compute something else
                raise UnsupportedArchitectureError(
                    f"{path}: tensor {tensor.name!r} (a bias on {name.rsplit('.', 1)[0]}) is not supported "
                    f"for architecture {config.architecture!r}"
                )
            continue
        qtype = _PACKED_FORMATS.get(tensor.tensor_type.name)
        if packed and qtype and tensor.data.ndim == 2:  # a matrix: kept as the file has it, one row of blocks a row
            blocks = tensor.data
            if permute and ".self_attn.q_proj." in name:
                blocks = _unpermute_rows(blocks, config.num_heads)
            elif permute and ".self_attn.k_proj." in name:
                blocks = _unpermute_rows(blocks, config.num_kv_heads)
            weights[name] = QuantizedTensor(torch.from_numpy(np.array(blocks)), qtype)
            weight_files[name] = str(path)
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise ModelLoadError(
                f"{path}: cannot dequantize tensor {tensor.name!r} of type {tensor.tensor_type.name} ({e})"
            ) from e
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        if permute and ".self_attn.q_proj." in name:
            array = _unpermute_rows(array, config.num_heads)
        elif permute and ".self_attn.k_proj." in name:
            array = _unpermute_rows(array, config.num_kv_heads)
        # np.array copies: unquantized tensors would otherwise stay views of the read-only file mapping
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32))
        weight_files[name] = str(path)
    return weights, weight_files


def _gguf_tokenizer(path: pathlib.Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot build the tokenizer from the GGUF metadata ({e})") from e


def load_gguf(path: pathlib.Path, progress: bool, packed: bool) -> tuple[Checkpoint, list[str]]:
    reader = _open_gguf(path)
    config = config_from_gguf(reader, str(path))
    weights, weight_files = _read_gguf_tensors(reader, config, path, progress, packed)
    tokenizer = _gguf_tokenizer(path)
    return Checkpoint(config, weights, tokenizer, path, weight_files), [str(path)]
