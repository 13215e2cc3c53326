"""A Llama-family decoder (Llama 2/3.x, Qwen2/2.5, Mistral) written against the paged cache.

The forward pass takes a flat batch of new tokens from many sequences; each layer stores
the new keys and values into the paged pools, then attends through the ops registry
(decode: one token per sequence; extend: several, causal among themselves). Weights are
plain tensors with q/k/v and gate/up fused so each layer runs four matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ttsearch import batch_invariant, ops
from ttsearch.ops.cpu_isa import has_fast_bf16
from ttsearch.models.config import ModelConfig
from ttsearch.models.rope import rope_inv_freq
from ttsearch.ops.quantized import QuantizedTensor


@dataclass
class ForwardBatch:
    """Where each new token goes and what it attends to. Built and index-checked by the
    engine's model runner (``ops.check_metadata``): the model's ops do not check it again."""

    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token (-1: already cached)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, sequence length including the new tokens
    query_start_loc: torch.Tensor | None  # [B + 1] int32; None when every sequence has one new token
    last_rows: torch.Tensor  # [B] int64, row of each sequence's last new token
    # decode only: sequences sharing a prefix of whole blocks, for cascade attention
    prefix_tables: torch.Tensor | None = None  # [G, W] int32
    prefix_lens: torch.Tensor | None = None  # [G] int32, tokens (whole blocks)
    seq_group: torch.Tensor | None = None  # [B] int32, group of each sequence or -1

    @property
    def is_decode(self) -> bool:
        return self.query_start_loc is None

    def to(self, device: torch.device) -> ForwardBatch:
        """The same batch with every tensor on ``device``."""
        # non_blocking: a copy from host memory need not wait for the device to drain
        return ForwardBatch(**{f.name: None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=True)
                               for f in fields(self)})


class Linear:
    """``x @ weight.T (+ bias)``. On a CPU, a float32 weight, and a bfloat16 one where the CPU
    multiplies bf16 in hardware, is laid out once at load in oneDNN's packed layout, which
    then replaces it (the weights are held once): its GEMM runs the model's thin decode
    shapes (M = batch, K and N the model's widths) faster than the default call (float32
    1.3-2.5x on the CPUs measured; a bf16 decode step 1.19x on an AMX Xeon). The result is
    the same GEMM, summed in another order."""

    PACK_FOR_ROWS = 64  # the batch size the layout is chosen for; any batch size runs on it

    def __init__(self, weight: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.quantized = weight if isinstance(weight, QuantizedTensor) else None  # GGUF blocks, multiplied as they are
        self.dtype = torch.uint8 if self.quantized else weight.dtype
        self.weight: torch.Tensor | None = None if self.quantized else weight  # None once packed
        self.packed = None
        packable = self.dtype == torch.float32 or (self.dtype == torch.bfloat16 and has_fast_bf16())
        if self.weight is not None and weight.device.type == "cpu" and packable and weight.numel() and _onednn_linear():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.PACK_FOR_ROWS)
            self.weight = None

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias, as plain tensors."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        if self.quantized is not None:
            return self.quantized.nbytes + bias
        return self.out_features * self.in_features * self.dtype.itemsize + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if batch_invariant.enabled() and x.shape[0] != batch_invariant.MATMUL_ROWS:
            return self._in_fixed_chunks(x)
        return self._matmul(x)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            y = torch.ops.ttsearch.quantized_linear(x, self.quantized.blocks, self.quantized.qtype)
            return y if self.bias is None else y + self.bias
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _in_fixed_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """Every row through a GEMM of exactly ``MATMUL_ROWS`` rows (batch-invariant mode)."""
        rows = batch_invariant.MATMUL_ROWS
        padded = x.new_zeros(-(-x.shape[0] // rows) * rows, x.shape[1])
        padded[: x.shape[0]] = x
        return torch.cat([self._matmul(chunk) for chunk in padded.split(rows)])[: x.shape[0]]


def _onednn_linear() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
    ):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        c = config
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim**-0.5

        def w(name: str) -> torch.Tensor | QuantizedTensor:
            t = weights[name]
            if isinstance(t, QuantizedTensor):
                return t.to(self.device)
            return t.to(device=self.device, dtype=dtype).contiguous()

        def stacked(names: list[str]) -> torch.Tensor | QuantizedTensor:
            """Weights multiplied as one: their rows stacked (blocks of one format stay blocks)."""
            parts = [w(name) for name in names]
            if all(isinstance(t, QuantizedTensor) for t in parts) and (blocks := QuantizedTensor.cat(parts)):
                return blocks
            return torch.cat([t.dequantize().to(dtype) if isinstance(t, QuantizedTensor) else t for t in parts])

        self.embed = w("model.embed_tokens.weight")
        self.final_norm = w("model.norm.weight")
        self.lm_head = self.embed if c.tie_word_embeddings else w("lm_head.weight")
        self.lm_head_linear = Linear(self.lm_head)
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            layer = {
                "input_norm": w(p + "input_layernorm.weight"),
                "post_norm": w(p + "post_attention_layernorm.weight"),
                "qkv": Linear(
                    stacked([p + f"self_attn.{n}_proj.weight" for n in "qkv"]),
                    torch.cat([w(p + f"self_attn.{n}_proj.bias") for n in "qkv"]) if c.attention_bias else None,
                ),
                "o": Linear(w(p + "self_attn.o_proj.weight")),
                "gate_up": Linear(stacked([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])),
                "down": Linear(w(p + "mlp.down_proj.weight")),
            }
            self.layers.append(layer)

        inv_freq = rope_inv_freq(c).to(self.device)
        t = torch.arange(max_len, device=self.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # row p: cos | sin of p * inv_freq, the layout ops.rotary_embedding reads
        self.cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype).contiguous()

    @property
    def weight_bytes(self) -> int:
        tensors = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        linears = [layer[name] for layer in self.layers for name in ("qkv", "o", "gate_up", "down")]
        norms = [layer[name] for layer in self.layers for name in ("input_norm", "post_norm")]
        return (sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size() for t in tensors + norms)
                + sum(lin.nbytes for lin in linears))

    def matmul_flops_per_token(self) -> int:
        """Multiply-adds x 2 of the weight matmuls one token costs (attention excluded)."""
        c = self.config
        per_layer = c.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * c.hidden_size
        per_layer += 3 * c.hidden_size * c.intermediate_size
        return 2 * (c.num_layers * per_layer + c.hidden_size * c.vocab_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` (before the final norm) of the new tokens."""
        c = self.config
        # The registered ops themselves, past the argument checks of ttsearch.ops: every shape
        # here is the model's own and the runner checked the metadata once (check_metadata).
        # The checks cost more than the small ops they guard (about 2 ms a decode step).
        op = torch.ops.ttsearch
        tokens = input_ids.shape[0]
        # The hidden state: each sublayer's output is added into it in place, fused with the
        # norm that follows (the first layer's input norm has nothing to add).
        residual = (self.embed[input_ids].to(self.dtype) if isinstance(self.embed, QuantizedTensor)
                    else F.embedding(input_ids, self.embed))
        h = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache[0, i], kv_cache[1, i]
            if h is None:
                h = torch.empty_like(residual)
                op.rms_norm(h, residual, layer["input_norm"], c.rms_norm_eps)
            else:
                op.fused_add_rms_norm(h, residual, layer["input_norm"], c.rms_norm_eps)
            qkv = layer["qkv"](h)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(tokens, c.num_heads, c.head_dim)
            k = k.view(tokens, c.num_kv_heads, c.head_dim)
            v = v.view(tokens, c.num_kv_heads, c.head_dim)
            op.rotary_embedding(batch.positions, q, k, self.cos_sin_cache)  # in place in qkv
            op.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
            if batch.prefix_tables is not None:
                attn = op.cascade_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                                   batch.prefix_tables, batch.prefix_lens, batch.seq_group, self.scale)
            elif batch.is_decode:
                attn = op.paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                                 self.scale)
            else:
                attn = op.paged_extend_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start_loc,
                                                 batch.context_lens, self.scale)
            h = layer["o"](attn.reshape(tokens, self.q_size))
            op.fused_add_rms_norm(h, residual, layer["post_norm"], c.rms_norm_eps)
            gate_up = layer["gate_up"](h)  # [gate | up]
            h = gate_up.new_empty(tokens, c.intermediate_size)
            op.silu_and_mul(h, gate_up)
            h = layer["down"](h)
        return residual if h is None else residual.add_(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` in the model's dtype from pre-norm hidden states ``[n, hidden]``
        (the sampler widens bf16 rows itself: a float32 copy of a batch's logits costs more
        than the LM head's GEMM at large batches)."""
        h = ops.rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return self.lm_head_linear(h)
