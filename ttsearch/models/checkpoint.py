"""A loaded checkpoint, whatever its format: config, weights by canonical HF name, tokenizer.

The model code consumes ``Checkpoint.weights`` by these names only; ``expected_shapes`` lists
every tensor the decoder (or a PRM's head) reads, and ``check_weights`` refuses a checkpoint
that lacks one or holds one of another shape.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ttsearch.errors import ModelLoadError
from ttsearch.models.config import ModelConfig
from ttsearch.ops.quantized import QuantizedTensor

if TYPE_CHECKING:  # transformers is imported lazily: it takes seconds to import
    from transformers import PreTrainedTokenizerBase


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedTensor]  # float32 CPU tensors (or blocks), canonical HF names
    tokenizer: PreTrainedTokenizerBase
    source: pathlib.Path
    weight_files: dict[str, str]  # tensor name -> file it came from


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
    check_shapes(expected_shapes(config), weights, weight_files, config.source, searched)


def check_shapes(shapes, weights, weight_files, source: str, searched: list[str] | None) -> None:
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
