"""GGUF's quantized block formats that ttsearch multiplies in place: how many weights a block
holds and in how many bytes. Plain Python, so that every layer can read it: the Triton
kernels, the ops (``ttsearch.ops.quantized`` has the bit layouts and the reference), the loader.

A quantized weight ``[N, K]`` is a uint8 tensor ``[N, K / elems * bytes]``: each row is the
row's blocks in file order, exactly as llama.cpp writes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    elems: int  # weights per block
    bytes: int  # bytes per block


#: ggml's formats that small models ship in (llama.cpp's names, lower case)
FORMATS = {
    "q4_0": BlockFormat(32, 18),    # fp16 d, 16 bytes of 4-bit q:          w = d * (q - 8)
    "q4_1": BlockFormat(32, 20),    # fp16 d, fp16 m, 16 bytes of 4-bit q:  w = d * q + m
    "q5_0": BlockFormat(32, 22),    # fp16 d, 32 high bits, 16 bytes of low nibbles: w = d * (q - 16)
    "q5_1": BlockFormat(32, 24),    # fp16 d, fp16 m, 32 high bits, 16 bytes:        w = d * q + m
    "q8_0": BlockFormat(32, 34),    # fp16 d, 32 int8 q:                    w = d * q
    "q4_K": BlockFormat(256, 144),  # fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales and mins, 128 bytes of q
    "q6_K": BlockFormat(256, 210),  # 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, fp16 d
}


def row_bytes(qtype: str, in_features: int) -> int:
    fmt = FORMATS[qtype]
    return in_features // fmt.elems * fmt.bytes


def in_features(qtype: str, blocks) -> int:
    """K of a weight kept in ``blocks`` (``[..., row bytes]``)."""
    fmt = FORMATS[qtype]
    return blocks.shape[-1] // fmt.bytes * fmt.elems
