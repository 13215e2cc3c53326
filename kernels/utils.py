"""Small helpers shared by the launchers."""

from __future__ import annotations

import torch
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(t: torch.Tensor) -> tl.dtype:
    """Operand dtype for ``tl.dot`` on data of ``t``'s dtype.

    On a GPU it is the data's own dtype (tensor cores). CPU tensors only run through
    Triton's interpreter, whose ``tl.dot`` multiplies bfloat16 bit patterns as integers,
    so there the operands go in float32: the same numbers, since a product of two 16-bit
    floats is exact in float32 and both paths accumulate in float32.
    """
    return _TL_DTYPES[t.dtype] if t.is_cuda else tl.float32
