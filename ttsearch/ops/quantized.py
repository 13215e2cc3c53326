"""GGUF's quantized weight formats, kept in their blocks: the bit layouts (block sizes in
``ttsearch.block_formats``), a pure-torch dequantization, and the reference body of
``quantized_linear``.

``quantized_linear`` multiplies by ``x`` rounded to int8 in groups of 32 features, each
group with its float32 scale (llama.cpp rounds its activations likewise), so that the
kernels can take a block's product with x as one integer dot product: ``round_groups``
says how, and every implementation rounds the same way at every batch size.

A quantized weight ``[N, K]`` is a uint8 tensor ``[N, K / block_elems * block_bytes]``: each
row is the row's blocks in file order, exactly as llama.cpp writes them (ggml's
``block_q4_0`` and friends, little-endian, fp16 scales). The fast implementations unpack a
block in registers and multiply at once; this file says what they must compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttsearch.block_formats import FORMATS, BlockFormat, in_features, row_bytes  # noqa: F401  (the layouts)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields ``[..., 2]`` bytes -> float32 ``[...]``."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: the low nibbles are elements 0-15, the high nibbles 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes, a little-endian uint32 -> its 32 bits, bit j for element j, as 0 or 16."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1
    return bits.reshape(*qh.shape[:-1], 32) << 4


def _k4_scales_and_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    low, high_m, packed = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([low & 63, (packed & 0x0F) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([high_m & 63, (packed >> 4) | ((high_m >> 6) << 4)], dim=-1)
    return sc.float(), mins.float()


def dequantize(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 ``[N, row_bytes]`` -> float32 ``[N, K]``."""
    fmt = FORMATS[qtype]
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, fmt.bytes)
    if qtype == "q8_0":
        w = _f16(b[..., 0:2]).unsqueeze(-1) * b[..., 2:].view(torch.int8).float()
    elif qtype in ("q4_0", "q4_1"):
        offset = 2 if qtype == "q4_0" else 4
        q = _nibbles(b[..., offset:]).float()
        d = _f16(b[..., 0:2]).unsqueeze(-1)
        w = d * (q - 8) if qtype == "q4_0" else d * q + _f16(b[..., 2:4]).unsqueeze(-1)
    elif qtype in ("q5_0", "q5_1"):
        offset = 2 if qtype == "q5_0" else 4
        q = (_nibbles(b[..., offset + 4:]) | _high_bits(b[..., offset:offset + 4])).float()
        d = _f16(b[..., 0:2]).unsqueeze(-1)
        w = d * (q - 16) if qtype == "q5_0" else d * q + _f16(b[..., 2:4]).unsqueeze(-1)
    elif qtype == "q4_K":
        d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
        sc, mins = _k4_scales_and_mins(b[..., 4:16])
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 32 bytes, each two sub-blocks of 32
        q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, -1, 8, 32).float()
        w = (d * sc).unsqueeze(-1) * q - (dmin * mins).unsqueeze(-1)
    elif qtype == "q6_K":
        ql = b[..., 0:128].reshape(n, -1, 2, 2, 32)  # [half of 128 weights][first/second 32 bytes][l]
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32)
        sc = b[..., 192:208].view(torch.int8).float().reshape(n, -1, 2, 4, 2)  # [half][group of 32][l // 16]
        d = _f16(b[..., 208:210]).reshape(n, -1, 1, 1, 1)
        # in each half of 128 weights, group g of 32: nibble (g // 2) of ql[g % 2], bits 2g..2g+1 of qh
        low = torch.cat([ql & 0x0F, ql >> 4], dim=3)  # [half][g][l]: g = 0 q1, 1 q2, 2 q3, 3 q4
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 1, 4, 1)
        high = (qh >> shifts) & 3
        q = (low | (high << 4)).float() - 32  # [n, blocks, half, 4, 32]
        w = d * sc.repeat_interleave(16, dim=-1) * q
    else:
        raise ValueError(f"unknown quantized format {qtype!r}; known: {', '.join(FORMATS)}")
    return w.reshape(n, -1)


GROUP = 32  # features of x per int8 group


def round_groups(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` rounded as ``quantized_linear`` rounds it, as float32: in each group of 32
    features, ``d = max |x| / 127`` and ``x -> d * round(x / d)`` (to nearest, ties to even;
    a group of zeros stays zero). Every value is then one of 255 multiples of its group's d."""
    groups = x.float().reshape(*x.shape[:-1], -1, GROUP)
    d = groups.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))  # the kernels multiply by 1 / d
    return (torch.round(groups * inverse) * d).reshape(x.shape)


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """``round_groups(x [M, K]) @ dequantize(blocks).T`` -> ``[M, N]`` in x's dtype, in float32."""
    return (round_groups(x) @ dequantize(blocks, qtype).T).to(x.dtype)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight ``[N, K]`` kept in its GGUF blocks: ``blocks`` uint8 ``[N, row_bytes]``."""

    blocks: torch.Tensor
    qtype: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], in_features(self.qtype, self.blocks)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def to(self, device: torch.device) -> QuantizedTensor:
        return QuantizedTensor(self.blocks.to(device).contiguous(), self.qtype)

    def __getitem__(self, rows) -> torch.Tensor:
        """The rows at ``rows`` (an index tensor or list), dequantized to float32: an
        embedding lookup reads only the rows it needs."""
        return dequantize(self.blocks[rows].reshape(-1, self.blocks.shape[1]), self.qtype).reshape(
            *torch.as_tensor(rows).shape, -1)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype)

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor | None:
        """Row-wise concatenation, or None when the parts differ in format."""
        if len({p.qtype for p in parts}) != 1:
            return None
        return QuantizedTensor(torch.cat([p.blocks for p in parts]), parts[0].qtype)
