"""prm_step_score: the fused verifier readout at step tags.

Per tag row of ``hidden [N, H]``: RMS norm (optional), dot with the head's 1 or 2 rows
(+ bias), then sigmoid (1 row) or the 2-way softmax's ``positive_index`` probability, and
the beam's running aggregate updated from ``prev_agg``/``prev_count``. Only the head rows
are read: full-vocabulary logits are never formed. One program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_AGGREGATIONS = {"last": 0, "min": 1, "prod": 2, "mean": 3}


@triton.jit
def _prm_step_score_kernel(
    hidden_ptr, norm_ptr, head_ptr, bias_ptr, prev_agg_ptr, prev_count_ptr, score_ptr, agg_ptr,
    eps,
    stride_xn, stride_xh, stride_wc, stride_wh,
    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, TWO_ROWS: tl.constexpr, POSITIVE: tl.constexpr,
    AGGREGATION: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = hidden_ptr + row.to(tl.int64) * stride_xn
    cols = tl.arange(0, BLOCK_H)

    if HAS_NORM:
        sum_sq = tl.zeros([BLOCK_H], tl.float32)
        for h in range(0, HIDDEN, BLOCK_H):
            x = tl.load(x_row + (h + cols) * stride_xh, mask=h + cols < HIDDEN, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = 1.0 / tl.sqrt_rn(tl.sum(sum_sq) / HIDDEN + eps)

    dot0 = tl.zeros([BLOCK_H], tl.float32)
    dot1 = tl.zeros([BLOCK_H], tl.float32)
    for h in range(0, HIDDEN, BLOCK_H):
        mask = h + cols < HIDDEN
        x = tl.load(x_row + (h + cols) * stride_xh, mask=mask, other=0.0)
        if HAS_NORM:
            # As the model's RMSNorm: normalise in float32, round to the activations' dtype,
            # then scale by the weight.
            x = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
            x = x * tl.load(norm_ptr + h + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(tl.float32)
        dot0 += x * tl.load(head_ptr + (h + cols) * stride_wh, mask=mask, other=0.0).to(tl.float32)
        if TWO_ROWS:
            dot1 += x * tl.load(head_ptr + stride_wc + (h + cols) * stride_wh, mask=mask, other=0.0).to(tl.float32)

    logit0 = tl.sum(dot0)
    if HAS_BIAS:
        logit0 += tl.load(bias_ptr).to(tl.float32)
    if TWO_ROWS:
        logit1 = tl.sum(dot1)
        if HAS_BIAS:
            logit1 += tl.load(bias_ptr + 1).to(tl.float32)
        # softmax([l0, l1])[positive] = sigmoid(l_positive - l_other)
        if POSITIVE == 1:
            margin = logit1 - logit0
        else:
            margin = logit0 - logit1
    else:
        margin = logit0
    score = 1.0 / (1.0 + tl.exp(-margin))

    prev = tl.load(prev_agg_ptr + row)
    count = tl.load(prev_count_ptr + row)
    if AGGREGATION == 0:
        agg = score
    elif AGGREGATION == 1:
        agg = tl.minimum(prev, score)
    elif AGGREGATION == 2:
        agg = prev * score
    else:
        agg = (prev * count.to(tl.float32) + score) / (count.to(tl.float32) + 1.0)
    tl.store(score_ptr + row, score)
    tl.store(agg_ptr + row, tl.where(count == 0, score, agg))  # count 0: the beam's first step


def prm_step_score(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    positive_index: int,
    prev_agg: torch.Tensor,
    prev_count: torch.Tensor,
    aggregation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, width = hidden.shape
    scores = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    aggregates = torch.empty_like(scores)
    if num_rows == 0:
        return scores, aggregates
    two_rows = head_weight.shape[0] == 2
    # The 1-D operands are tiny; contiguous copies keep the kernel's indexing simple.
    norm = norm_weight.contiguous() if norm_weight is not None else hidden
    bias = head_bias.contiguous() if head_bias is not None else hidden
    _prm_step_score_kernel[(num_rows,)](
        hidden, norm, head_weight, bias, prev_agg.contiguous(), prev_count.contiguous(), scores, aggregates,
        eps,
        *hidden.stride(), *head_weight.stride(),
        HIDDEN=width, BLOCK_H=min(1024, triton.next_power_of_2(width)),
        HAS_NORM=norm_weight is not None, HAS_BIAS=head_bias is not None,
        TWO_ROWS=two_rows, POSITIVE=positive_index if two_rows else 0,
        AGGREGATION=_AGGREGATIONS[aggregation],
    )
    return scores, aggregates
