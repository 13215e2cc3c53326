"""Batch-invariant mode: a sequence's numbers do not depend on what else is in its batch.

In the default mode a matmul picks its kernel and blocking from the number of rows, decode
attention splits contexts by how many sequences share the step, and cascade attention
reads a prefix once for the beams that share it: each changes the order in which sums are
taken, and in bfloat16 that changes rounding, so the same seed can give other tokens when
other problems share the batch. With the mode on (``TTSEARCH_BATCH_INVARIANT=1``,
``Engine(batch_invariant=True)`` or ``ttsearch --batch-invariant``):

- weight matmuls run in chunks of ``MATMUL_ROWS`` rows, the last chunk zero-padded, so
  every row goes through the same kernel whatever the batch;
- decode attention reads every context on its own (no shared-prefix cascade) and splits
  it by nothing the batch decides: at fixed token counts on the CPU, not at all on CUDA;
- everything else the model does (norms, RoPE, activations, sampling) already works row
  by row.

The mode is process-wide, as the kernels it steers are.
"""

from __future__ import annotations

import os

#: rows per matmul call in batch-invariant mode: below it a CPU GEMM is bound by reading
#: the weights, so padding a small batch up to it costs little
MATMUL_ROWS = 32

_enabled = os.environ.get("TTSEARCH_BATCH_INVARIANT", "0") not in ("", "0")


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)
