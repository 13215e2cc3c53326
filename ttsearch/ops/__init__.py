"""The ttsearch ops: one public function per op, which checks its arguments and dispatches.

Each op is defined once in ``ttsearch.ops.registry`` (schema, pure-torch reference body from
``ttsearch.ops.reference``, fake kernel) and served per device by the implementation the
registry loaded: the C++ extension ``ttsearch._C_<isa>`` on CPU, the Triton kernels in
``ttsearch.kernels`` on CUDA. Call sites never branch on the device. ``TTSEARCH_OPS``
(``auto``, ``reference`` or ``fast``) chooses what is loaded; see the registry.

The functions below validate their arguments (shapes, dtypes, devices, index ranges; the
checks live in ``ttsearch.ops.checks``) before dispatch, so no implementation ever sees a
bad block table. The index checks read tensor data; a model checks its host-side metadata
once per forward with ``check_metadata`` and calls the ops with ``check_indices=False``, so
on a GPU no layer waits for a device-to-host copy.
"""

from __future__ import annotations

import torch

from ttsearch.ops import checks, quantized, reference, registry
from ttsearch.ops.checks import FLOAT_DTYPES as _FLOAT_DTYPES
from ttsearch.ops.checks import HEAD_DIM_MULTIPLE, check_block_copies, check_metadata, check_sampling_values
from ttsearch.ops.checks import check as _check
from ttsearch.ops.registry import IMPLEMENTATIONS, MODE


def store_kv(key, value, k_cache, v_cache, slot_mapping, *, check_indices: bool = True) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into their slots; slot -1 is skipped.

    ``check_indices=False`` (here and in every attention op): the caller checked the index
    tensors with ``check_metadata`` on the host; the op then reads no tensor data."""
    checks.check_store_kv(key, value, k_cache, v_cache, slot_mapping, check_indices)
    torch.ops.ttsearch.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale: float, *,
                           check_indices: bool = True):
    """``query [B, H, D]`` (one token per sequence) against each sequence's paged context."""
    checks.check_paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale, check_indices)
    return torch.ops.ttsearch.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)


def cascade_decode_attention(
    query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale: float, *,
    check_indices: bool = True,
):
    """Decode attention that reads each shared prefix node once for all the sequences below it.

    The result is ``paged_decode_attention(query, k_cache, v_cache, block_tables,
    context_lens, scale)``; the extra arguments describe a tree of shared prefixes:

    - ``prefix_tables [G, W]``, ``prefix_lens [G]``: node (group) ``g`` holds
      ``prefix_lens[g]`` tokens, whole blocks (a multiple of block_size, at least one
      block), in ``prefix_tables[g, :prefix_lens[g] // block_size]``;
    - ``seq_group [B, L]``: row ``b`` lists the nodes on sequence ``b``'s path, outermost
      first, then -1 padding (never a node after a -1). Or ``seq_group [B]``: one node per
      sequence, or -1 for none (the one-level case, L = 1).

    The nodes on ``b``'s path tile the start of its context in order: the node at level
    ``l`` covers tokens ``[start, start + prefix_lens[g])``, ``start`` the sum of
    ``prefix_lens`` of the nodes before it, and ``b``'s block table holds exactly that
    node's blocks at those columns. The path must fit the context: the sum of its
    ``prefix_lens`` is at most ``context_lens[b]`` (equal is allowed: ``b`` then has no
    tokens of its own). A node is at the same level on every path that holds it (its
    members are the sequences below it in the tree); it may have one member or none.
    Anything else raises ValueError naming the sequence, level, node and column.
    """
    checks.check_cascade_decode_attention(query, k_cache, v_cache, block_tables, context_lens, prefix_tables,
                                          prefix_lens, seq_group, scale, check_indices)
    return torch.ops.ttsearch.cascade_decode_attention(
        query, k_cache, v_cache, block_tables, context_lens, prefix_tables, prefix_lens, seq_group, scale
    )


def paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale: float, *,
                           check_indices: bool = True):
    """New tokens ``query [T, H, D]`` of several sequences, causal among themselves, against
    each sequence's paged context (which already holds their keys and values)."""
    checks.check_paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale,
                                        check_indices)
    return torch.ops.ttsearch.paged_extend_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
    )


def copy_blocks(kv_cache, src, dst, *, check_indices: bool = True) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer of ``kv_cache [2, L, NB, BS, Hkv, D]``."""
    checks.check_copy_blocks(kv_cache, src, dst, check_indices)
    torch.ops.ttsearch.copy_blocks(kv_cache, src, dst)


def prm_step_score(
    hidden, norm_weight, eps: float, head_weight, head_bias, positive_index: int, prev_agg, prev_count, aggregation: str
):
    """P(good) per tag from hidden states at the tags ``[N, hidden]`` (final norm, then only
    the head's 1 or 2 rows), and each beam's running aggregate. See the reference body."""
    checks.check_prm_step_score(hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count,
                                aggregation)
    return torch.ops.ttsearch.prm_step_score(
        hidden, norm_weight, eps, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation
    )


# ----------------------------------------------------------------------------- fused elementwise ops
# These run several times per layer, so their checks compare shapes, dtypes and devices
# only; tensor data is read only for rotary positions (check_indices) and sampling settings
# (check_values).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rms_norm(x) * weight`` over the last dim (normalized in float32, rounded to x's dtype,
    then scaled), into ``out`` (new if None); returns ``out``."""
    checks.check_norm(x, weight, eps)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    checks.check_like("out", out, x.shape, x)
    x_rows = x.reshape(-1, x.shape[-1])
    if x_rows.shape[1] > 1 and x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    torch.ops.ttsearch.rms_norm(checks.as_rows("out", out), x_rows, weight, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place, in one pass: ``residual += x``, then ``x = rms_norm(residual) * weight``."""
    checks.check_norm(x, weight, eps)
    checks.check_like("residual", residual, x.shape, x)
    torch.ops.ttsearch.fused_add_rms_norm(checks.as_rows("x", x), checks.as_rows("residual", residual), weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor,
                     *, check_indices: bool = True) -> None:
    """Rotate-half (GPT-NeoX) RoPE in place on ``query [T, H, D]`` and ``key [T, Hkv, D]``
    (views into a fused qkv output are fine: any token stride, each token's heads
    contiguous). Row ``p`` of ``cos_sin_cache [max_pos, D]`` is cos, then sin, of
    ``p * inv_freq`` (D/2 each), in the query's dtype."""
    checks.check_rotary_embedding(positions, query, key, cos_sin_cache, check_indices)
    torch.ops.ttsearch.rotary_embedding(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (gate, then up), into ``out``
    (new if None); returns ``out``."""
    checks.check_silu_and_mul_input(x)
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    checks.check_like("out", out, shape, x)
    x_rows = x.reshape(-1, x.shape[-1])
    if x_rows.shape[1] > 1 and x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    torch.ops.ttsearch.silu_and_mul(checks.as_rows("out", out), x_rows)
    return out


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (float32, or bfloat16 / float16 widened to float32)
    -> int64 ``[B]``: per row a temperature (0: greedy), ``top_k`` (0: off, 1: greedy),
    ``top_p`` in (0, 1] (1: off) and one uniform draw ``u`` in [0, 1).
    ``reference.sample_tokens`` states the rule exactly. ``check_values=False``: the caller
    checked the settings on the host with ``check_sampling_values``; nothing is read here."""
    checks.check_sample_tokens(logits, temperature, top_k, top_p, u, check_values)
    return torch.ops.ttsearch.sample_tokens(logits, temperature, top_k, top_p, u)


registry.load_fast_implementations()

__all__ = [
    "store_kv",
    "paged_decode_attention",
    "paged_extend_attention",
    "cascade_decode_attention",
    "copy_blocks",
    "prm_step_score",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "sample_tokens",
    "check_metadata",
    "check_block_copies",
    "check_sampling_values",
    "reference",
    "IMPLEMENTATIONS",
    "MODE",
    "HEAD_DIM_MULTIPLE",
]


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x [..., K] @ W.T`` for a weight ``W [N, K]`` kept in GGUF's quantized blocks ``blocks
    [N, K / block_elems * block_bytes]`` (uint8, ``ttsearch.ops.quantized`` has the layouts)
    -> ``[..., N]`` in x's dtype. x is taken rounded to int8 in groups of 32 features, as
    llama.cpp takes it (``quantized.round_groups``)."""
    _check(qtype in quantized.FORMATS, f"qtype {qtype!r}: expected one of {', '.join(quantized.FORMATS)}")
    fmt = quantized.FORMATS[qtype]
    _check(blocks.dim() == 2 and blocks.dtype == torch.uint8 and blocks.shape[1] % fmt.bytes == 0,
           f"blocks: expected uint8 [out_features, a multiple of {fmt.bytes} bytes] for {qtype}, "
           f"got {blocks.dtype} {tuple(blocks.shape)}")
    _check(blocks.is_contiguous() and blocks.device == x.device, "blocks must be contiguous and on x's device")
    _check(x.dtype in _FLOAT_DTYPES, f"x: expected a float32, bfloat16 or float16 input, got {x.dtype}")
    k = quantized.in_features(qtype, blocks)
    _check(x.dim() >= 1 and x.shape[-1] == k, f"x: expected [..., {k}] for these {qtype} blocks, got {tuple(x.shape)}")
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) != k):
        rows = rows.contiguous()
    return torch.ops.ttsearch.quantized_linear(rows, blocks, qtype).reshape(*x.shape[:-1], blocks.shape[0])
