"""quantized_linear: ``y = x @ W.T`` with ``W`` kept in GGUF's quantized blocks (layouts in
ttsearch/ops/quantized.py). Each program owns a tile of outputs and walks K one quantized
block at a time, 32 weights at a time: the tile of W is read as bytes, dequantized in
registers, and multiplied with ``tl.dot``, accumulating in float32; W is never written out
dequantized. x is rounded to int8 per group of 32 features in the same loop, as the op's
contract says (``quantized.round_groups``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttsearch.kernels.utils import dot_dtype
from ttsearch.block_formats import FORMATS

_QTYPES = {name: i for i, name in enumerate(FORMATS)}  # the kernel's QTYPE constexpr


@triton.jit
def _byte(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _f16(ptr):
    """The little-endian fp16 at ``ptr`` (bytes), as float32."""
    bits = (_byte(ptr) | (_byte(ptr + 1) << 8)).to(tl.uint16)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize(block, e, QTYPE: tl.constexpr):
    """Weights ``e`` (element indices within a block) of the blocks at ``block`` (byte pointers,
    one per output row), as float32; QTYPE is the index of the format in FORMATS."""
    if QTYPE == 0:  # q4_0
        q = (_byte(block + 2 + e % 16) >> (4 * (e // 16))) & 15
        w = _f16(block) * (q - 8).to(tl.float32)
    elif QTYPE == 1:  # q4_1
        q = (_byte(block + 4 + e % 16) >> (4 * (e // 16))) & 15
        w = _f16(block) * q.to(tl.float32) + _f16(block + 2)
    elif QTYPE == 2:  # q5_0: the fifth bit of element e is bit e of the 32-bit word at byte 2
        q = ((_byte(block + 6 + e % 16) >> (4 * (e // 16))) & 15) | (((_byte(block + 2 + e // 8) >> (e % 8)) & 1) << 4)
        w = _f16(block) * (q - 16).to(tl.float32)
    elif QTYPE == 3:  # q5_1
        q = ((_byte(block + 8 + e % 16) >> (4 * (e // 16))) & 15) | (((_byte(block + 4 + e // 8) >> (e % 8)) & 1) << 4)
        w = _f16(block) * q.to(tl.float32) + _f16(block + 2)
    elif QTYPE == 4:  # q8_0
        q = tl.load(block + 2 + e).to(tl.int8, bitcast=True)
        w = _f16(block) * q.to(tl.float32)
    elif QTYPE == 5:  # q4_K: 8 sub-blocks of 32, six-bit scales and mins packed in 12 bytes at byte 4
        sub = e // 32
        low = sub < 4
        s_sub = _byte(block + 4 + sub)
        s_plus = _byte(block + 8 + sub)
        s_minus = _byte(block + 4 + tl.where(low, sub, sub - 4))
        sc = tl.where(low, s_sub & 63, (s_plus & 15) | ((s_minus >> 6) << 4))
        mn = tl.where(low, s_plus & 63, (s_plus >> 4) | ((s_sub >> 6) << 4))
        q = (_byte(block + 16 + 32 * (sub // 2) + e % 32) >> (4 * (sub % 2))) & 15
        w = _f16(block) * sc.to(tl.float32) * q.to(tl.float32) - _f16(block + 2) * mn.to(tl.float32)
    else:  # q6_K: per half of 128, group g of 32: nibble g // 2 of 32 low bytes, bits 2g..2g+1 of the high ones
        half = e // 128
        g = (e % 128) // 32
        lane = e % 32
        low = (_byte(block + 64 * half + 32 * (g % 2) + lane) >> (4 * (g // 2))) & 15
        high = (_byte(block + 128 + 32 * half + lane) >> (2 * g)) & 3
        scale = tl.load(block + 192 + 8 * half + 2 * g + lane // 16).to(tl.int8, bitcast=True).to(tl.float32)
        w = _f16(block + 208) * scale * ((low | (high << 4)) - 32).to(tl.float32)
    return w


@triton.jit
def _round_group(x):
    """``x [rows, 32]`` float32 rounded as ``quantized.round_groups`` rounds each row."""
    d = tl.max(tl.abs(x), axis=1) / 127
    inverse = tl.where(d > 0, 1 / tl.where(d > 0, d, 1.0), 0.0)  # a row of zeros (masked off) stays zero
    scaled = x * inverse[:, None]
    # to nearest, ties to even: adding and taking away 1.5 * 2**23 drops the fraction (|scaled| <= 127)
    rounded = (scaled + 12582912.0) - 12582912.0
    return rounded * d[:, None]


@triton.jit
def _quantized_linear_kernel(x_ptr, w_ptr, y_ptr, M, N, K, row_bytes, stride_x, stride_y, QTYPE: tl.constexpr,
                             ELEMS: tl.constexpr, BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, K // ELEMS):
        # masked-off columns read row 0's blocks: always in bounds, never stored
        blocks = w_ptr + tl.where(col_ok, cols, 0).to(tl.int64)[:, None] * row_bytes + b * BYTES
        # 32 weights of each block at a time: a K-quant's 256 would not fit in registers
        for chunk in tl.static_range(ELEMS // 32):
            e = chunk * 32 + tl.arange(0, 32)
            w = _dequantize(blocks, e[None, :], QTYPE)  # [BLOCK_N, 32]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + b * ELEMS + e[None, :],
                        mask=row_ok[:, None], other=0.0)
            acc += tl.dot(_round_group(x.to(tl.float32)).to(DOT), tl.trans(w).to(DOT), input_precision="ieee" if DOT == tl.float32 else None)
    out = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quantized_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    fmt = FORMATS[qtype]
    m, k = x.shape
    n = blocks.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n = 16, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quantized_linear_kernel[grid](x, blocks, y, m, n, k, blocks.shape[1], x.stride(0), y.stride(0),
                                   QTYPE=_QTYPES[qtype], ELEMS=fmt.elems, BYTES=fmt.bytes, BLOCK_M=block_m,
                                   BLOCK_N=block_n, DOT=dot_dtype(x))
    return y
