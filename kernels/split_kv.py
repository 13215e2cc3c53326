"""Split-KV (flash-decoding) for the decode kernels: how many splits, each split's range,
its partial result, and the kernel that merges the partials.

A decode grid of (sequence, kv head) programs leaves most of a GPU idle when sequences are
few and contexts long. Split each context along its length into ``num_splits`` ranges, one
program each (grid axis 2): each stores its normalised output and log-sum-exp (log2
domain) to float32 scratch, and ``merge_splits`` combines them by log-sum-exp. With one
split the kernels store the output directly and no merge runs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ttsearch import batch_invariant

#: the shortest split the heuristic makes, in tokens: below it a program's fixed costs
#: (query load, partial store, its share of the merge) outweigh its reads
MIN_SPLIT_TOKENS = 256
#: the most splits the heuristic makes: the merge walks them all in one tile
MAX_SPLITS = 64
#: stands in for the SM count under Triton's interpreter (CPU tensors), which runs the
#: programs one by one: any fixed number keeps the heuristic's path testable
INTERPRETER_SMS = 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(programs: int, max_tokens: int, device: torch.device) -> int:
    """Splits per context for a grid of ``programs`` (sequence, kv head) programs whose
    contexts hold at most ``max_tokens`` tokens: enough that all programs fill every SM
    about twice, each split at least ``MIN_SPLIT_TOKENS`` of a longest context; 1 when the
    grid already fills the GPU. ``max_tokens`` is a host-side bound (a table's width), so
    choosing never waits for the device. In batch-invariant mode always 1: a count chosen
    from the batch would change the order of a sequence's sums with its neighbours."""
    target = 2 * sm_count(device)
    if programs <= 0 or programs >= target or batch_invariant.enabled():
        return 1
    return max(1, min(triton.cdiv(target, programs), max_tokens // MIN_SPLIT_TOKENS, MAX_SPLITS))


@triton.jit
def split_range(lo, hi, TILE: tl.constexpr):
    """This program's part of ``[lo, hi)``: split ``program_id(2)`` of ``num_programs(2)``,
    whole tiles of ``TILE`` tokens from ``lo``, as many tiles to each split (the last ones
    may be short or empty). With one split it is ``[lo, hi)``."""
    # Plain arithmetic rather than tl.cdiv: a nested jit call is slow in the interpreter.
    tiles = (hi - lo + TILE - 1) // TILE
    per_split = (tiles + tl.num_programs(2) - 1) // tl.num_programs(2) * TILE
    start = lo + tl.program_id(2) * per_split
    return start, tl.minimum(start + per_split, hi)


@triton.jit
def store_split(out_ptr, lse_ptr, rows, row_mask, m, l, acc, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store rows ``rows`` of a split's partial: ``acc / l`` to ``out_ptr [.., HEAD_DIM]``
    and ``m + log2(l)`` to ``lse_ptr``. A split that saw no key (l = 0, m = -inf) stores
    0 and -inf: weight 0 in the merge, and no 0 / 0."""
    d = tl.arange(0, BLOCK_D)
    saw_keys = l > 0
    l = tl.where(saw_keys, l, 1.0)
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :], acc / l[:, None],
             mask=row_mask[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(lse_ptr + rows, tl.where(saw_keys, m + tl.log2(l), float("-inf")), mask=row_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, num_heads,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    rows = (seq * num_heads + head) * num_splits + s  # into the contiguous [B, H, S] scratch
    lse = tl.load(part_lse_ptr + rows, mask=s < num_splits, other=float("-inf"))
    # Finite: a context is never empty, so some split saw a key.
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    o = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                mask=(s < num_splits)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def split_scratch(query: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partial outputs ``[B, H, S, D]`` and log-sum-exps ``[B, H, S]``."""
    batch, num_heads, head_dim = query.shape
    out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
    return out, lse


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """``out [B, H, D]`` from the partials ``[B, H, S, D]`` and ``[B, H, S]`` by log-sum-exp."""
    batch, num_heads, num_splits, head_dim = part_out.shape
    _merge_kernel[(batch, num_heads)](
        part_out, part_lse, out, num_splits, num_heads, *out.stride(),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
