"""prm_step_score, every implementation (see ops_cases.py): P(good) at step tags and each
beam's running aggregate, for LM-head rows and value heads."""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import (DTYPES, IMPLS, PRM_HEADS, PRM_SHAPES, TOL, assert_within, device, naive_prm_step_score,
                       prm_inputs, prm_module)
from ttsearch.aggregation import AGGREGATIONS
from ttsearch.ops import reference



# ----------------------------------------------------------------------------- reference and C++


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("head", PRM_HEADS)
@pytest.mark.parametrize("num_rows,width", PRM_SHAPES, ids=[f"n{n}-h{w}" for n, w in PRM_SHAPES])
def test_prm_step_score(impl, dtype, aggregation, head, num_rows, width):
    rows, positive_index, use_norm, use_bias = PRM_HEADS[head]
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        num_rows, width, rows, dtype, torch.int32 if use_bias else torch.int64, seed=num_rows + width
    )
    args = (hidden, norm_weight if use_norm else None, 1e-5, head_weight, head_bias if use_bias else None,
            positive_index, prev_agg, prev_count, aggregation)
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    oracle = reference.prm_step_score if impl == "cpp" else naive_prm_step_score

    scores, aggregates = op(*args)

    expected_scores, expected_aggregates = oracle(*args)
    assert scores.dtype == aggregates.dtype == torch.float32
    assert (scores - expected_scores).abs().max() <= TOL[dtype]
    assert (aggregates - expected_aggregates).abs().max() <= TOL[dtype]
    assert scores.data_ptr() != aggregates.data_ptr()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float64, torch.float32),
     (torch.float32, torch.bfloat16)],
)
def test_prm_step_score_other_dtypes(impl, dtype, weight_dtype):
    """Weights in another dtype than the states (a float32 head on bfloat16 states, ...)."""
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        9, 200, 2, dtype, weight_dtype=weight_dtype
    )
    args = (hidden, norm_weight, 1e-6, head_weight, head_bias, 1, prev_agg, prev_count, "mean")
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    oracle = reference.prm_step_score if impl == "cpp" else naive_prm_step_score
    tol = TOL[torch.float32] if dtype in (torch.float32, torch.float64) else TOL[torch.bfloat16]
    for actual, expected in zip(op(*args), oracle(*args)):
        assert (actual - expected).abs().max() <= tol


@pytest.mark.parametrize("impl", IMPLS)
def test_prm_step_score_strided_hidden_and_empty(impl):
    """Tag rows sliced out of wider hidden states, and no tags at all."""
    op = ops.prm_step_score if impl == "cpp" else reference.prm_step_score
    hidden, norm_weight, head_weight, _, prev_agg, prev_count = prm_inputs(5, 64, 2, torch.float32)
    wide = torch.randn(5, 3 * 64)
    wide[:, 64:128] = hidden
    args = (norm_weight, 1e-6, head_weight, None, 1, prev_agg, prev_count, "min")
    for actual, expected in zip(op(wide[:, 64:128], *args), naive_prm_step_score(hidden, *args)):
        assert (actual - expected).abs().max() <= TOL[torch.float32]
    scores, aggregates = op(torch.empty(0, 64), None, 1e-6, head_weight, None, 0, torch.empty(0),
                            torch.empty(0, dtype=torch.int32), "last")
    assert scores.shape == aggregates.shape == (0,)


# ----------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize(
    "rows,positive_index,use_norm,use_bias",
    [(2, 1, True, False), (2, 0, True, True), (1, 0, False, True), (1, 0, True, False)],
    ids=["two-rows-pos1-norm", "two-rows-pos0-norm-bias", "value-head-bias", "value-head-norm"],
)
@pytest.mark.parametrize("dtype,width", [(torch.float32, 576), (torch.bfloat16, 576), (torch.float32, 1500)])
def test_triton_prm_step_score(device, aggregation, rows, positive_index, use_norm, use_bias, dtype, width):
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(
        7, width, rows, dtype, torch.int64 if use_bias else torch.int32, seed=rows + width
    )
    norm_weight = norm_weight if use_norm else None
    head_bias = head_bias if use_bias else None
    args = (hidden, norm_weight, 1e-5, head_weight, head_bias, positive_index, prev_agg, prev_count, aggregation)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]

    scores, aggregates = prm_module.prm_step_score(*on_device)

    expected_scores, expected_aggregates = reference.prm_step_score(*args)
    assert_within(scores, expected_scores, TOL[dtype])
    assert_within(aggregates, expected_aggregates, TOL[dtype])
    assert scores.data_ptr() != aggregates.data_ptr()


def test_triton_prm_step_score_strided_hidden_and_empty(device):
    hidden, norm_weight, head_weight, _, prev_agg, prev_count = prm_inputs(5, 64, 2, torch.float32, torch.int32, 0)
    wide = torch.randn(5, 3 * 64)
    wide[:, 64:128] = hidden
    args = (norm_weight, 1e-6, head_weight, None, 1, prev_agg, prev_count, "min")
    wide_dev = wide.to(device)
    scores, aggregates = prm_module.prm_step_score(
        wide_dev[:, 64:128], *[a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    )
    expected = reference.prm_step_score(wide[:, 64:128], *args)
    assert_within(scores, expected[0], TOL[torch.float32])
    assert_within(aggregates, expected[1], TOL[torch.float32])

    empty = torch.empty(0, device=device)
    scores, aggregates = prm_module.prm_step_score(
        torch.empty(0, 64, device=device), None, 1e-6, head_weight.to(device), None, 0, empty,
        torch.empty(0, dtype=torch.int32, device=device), "last",
    )
    assert scores.shape == aggregates.shape == (0,)
