"""The KV cache tensors: one allocation for every layer's K and V pools."""

from __future__ import annotations

import torch

from ttsearch.models.config import ModelConfig


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """kappa, the bytes of K and V of one token in every layer: a decode step over search trees
    holding U unique tokens moves W + U * kappa bytes (W the weights' bytes)."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.tensor([], dtype=dtype).element_size()


def allocate_kv_cache(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, block_size: int, kv_cache_bytes: int
) -> torch.Tensor:
    """``[2, layers, num_blocks, block_size, kv_heads, head_dim]``, as many blocks as fit the budget."""
    block_bytes = block_size * bytes_per_token(config, dtype)
    num_blocks = kv_cache_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} holds no block: one block of {block_size} tokens "
            f"takes {block_bytes} bytes for this model in {dtype}"
        )
    shape = (2, config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
