"""The fused elementwise ops (rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul),
``cpp`` and ``triton`` against the reference bodies (see ops_cases.py)."""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import FUSED_DEVICE as DEVICE
from ops_cases import FUSED_DTYPES as DTYPES
from ops_cases import HAS_CUDA, fused_impl, randn  # noqa: F401  (fused_impl: the ``impl`` fixture)
from ops_cases import assert_fused_close as assert_close
from ops_cases import rotary_module as rotary
from ops_cases import run_fused as run
from ttsearch.ops import reference



# ----------------------------------------------------------------------------- norms


# (rows, hidden, row stride): a decode batch at SmolLM2's width, widths off the vector size,
# a single row, no rows, and rows that are a strided slice of a wider buffer.
NORM_SHAPES = [(64, 576, 576), (5, 100, 100), (1, 8, 8), (0, 64, 64), (3, 72, 96)]


TRITON_NORM_SHAPES = [(5, 100, 100), (3, 72, 96)]


def norm_inputs(rows, hidden, stride, dtype, seed=0):
    x = randn(rows, stride, dtype=dtype, seed=seed, scale=2.0)[:, :hidden]
    residual = randn(rows, stride, dtype=dtype, seed=seed + 1)[:, :hidden]
    weight = (torch.rand(hidden, generator=torch.Generator().manual_seed(seed + 2)) + 0.5).to(dtype)
    return x, residual, weight


def norm_cases(impl):
    return TRITON_NORM_SHAPES if impl == "triton" else NORM_SHAPES


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(impl, dtype):
    for rows, hidden, stride in norm_cases(impl):
        x, _, weight = norm_inputs(rows, hidden, stride, dtype)
        out = torch.empty(rows, hidden, dtype=dtype)
        (got, *_), _ = run(impl, "rms_norm", out, x, weight, 1e-6)
        expected = torch.empty_like(out)
        reference.rms_norm(expected, x, weight, 1e-6)
        assert_close(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(impl, dtype):
    for rows, hidden, stride in norm_cases(impl):
        x, residual, weight = norm_inputs(rows, hidden, stride, dtype)
        (got_x, got_res, *_), _ = run(impl, "fused_add_rms_norm", x, residual, weight, 1e-5)
        want_x, want_res = x.clone(), residual.clone()
        reference.fused_add_rms_norm(want_x, want_res, weight, 1e-5)
        if impl == "cpp" or HAS_CUDA or dtype != torch.bfloat16:
            assert torch.equal(got_res, want_res), "the residual add rounds once, as the reference's"
        else:  # the interpreter truncates float32 -> bf16 (triton/runtime/interpreter.py, _convert_float)
            assert_close(got_res, want_res)
        assert_close(got_x, want_x)


def test_norm_public_ops_check_and_keep_shape():
    x = randn(2, 3, 64)
    weight = torch.ones(64)
    assert ops.rms_norm(x, weight, 1e-6).shape == (2, 3, 64)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.ones(63), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.fused_add_rms_norm(x, x[..., :32].clone(), weight, 1e-6)
    with pytest.raises(ValueError, match="not viewable as rows"):
        ops.fused_add_rms_norm(x.transpose(0, 1), x.transpose(0, 1).clone(), weight, 1e-6)


# ----------------------------------------------------------------------------- rotary


# (tokens, heads, kv heads, head_dim): SmolLM2's 9/3 x 64, GQA 4/1 x 128, a head_dim whose
# half is no multiple of the vector width, one token.
ROPE_SHAPES = [(37, 9, 3, 64), (5, 4, 1, 128), (6, 2, 2, 40), (1, 3, 1, 64)]


TRITON_ROPE_SHAPES = [(5, 4, 1, 128), (6, 2, 2, 40)]


def rope_inputs(tokens, heads, kv_heads, dim, dtype, max_pos=300):
    """q and k as views into one fused qkv output, as the model has them, and the cache."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=3)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=torch.Generator().manual_seed(4))
    return qkv, q, k, positions, cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding(impl, dtype):
    for tokens, heads, kv_heads, dim in TRITON_ROPE_SHAPES if impl == "triton" else ROPE_SHAPES:
        qkv, q, k, positions, cache = rope_inputs(tokens, heads, kv_heads, dim, dtype)
        device = "cpu" if impl == "cpp" else DEVICE
        got = qkv.to(device, copy=True)
        q_dev = got[:, : heads * dim].view(tokens, heads, dim)
        k_dev = got[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        if impl == "cpp":
            ops.rotary_embedding(positions, q_dev, k_dev, cache)
        else:
            rotary.rotary_embedding(positions.to(device), q_dev, k_dev, cache.to(device))
        reference.rotary_embedding(positions, q, k, cache)  # in place in qkv
        got = got.cpu()
        assert_close(got, qkv)
        v_cols = slice((heads + kv_heads) * dim, None)
        assert torch.equal(got[:, v_cols], qkv[:, v_cols]), "values are not rotated"


def test_rotary_reference_is_the_models_rope():
    """The reference body is llama.py's rotate-half RoPE with a cos | sin cache."""
    qkv, q, k, positions, cache = rope_inputs(7, 4, 2, 64, torch.float32)
    half = 32
    emb = torch.cat((cache[:, :half], cache[:, :half]), -1), torch.cat((cache[:, half:], cache[:, half:]), -1)
    cos, sin = emb[0][positions].unsqueeze(1), emb[1][positions].unsqueeze(1)
    expected = [x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin for x in (q, k)]
    reference.rotary_embedding(positions, q, k, cache)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_rotary_checks_positions():
    _, q, k, positions, cache = rope_inputs(3, 2, 1, 64, torch.float32, max_pos=10)
    with pytest.raises(ValueError, match="positions span"):
        ops.rotary_embedding(positions + 10, q, k, cache)
    with pytest.raises(ValueError, match="heads must be contiguous"):
        ops.rotary_embedding(positions, torch.randn(3, 64, 2).transpose(1, 2), k, cache)


# ----------------------------------------------------------------------------- activation


ACT_SHAPES = [(64, 1536), (3, 200), (1, 16), (0, 32)]


TRITON_ACT_SHAPES = [(3, 200), (2, 48)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(impl, dtype):
    for rows, width in TRITON_ACT_SHAPES if impl == "triton" else ACT_SHAPES:
        x = randn(rows, width, dtype=dtype, seed=5, scale=3.0)
        out = torch.empty(rows, width // 2, dtype=dtype)
        (got, _), _ = run(impl, "silu_and_mul", out, x)
        expected = torch.empty_like(out)
        reference.silu_and_mul(expected, x)
        assert_close(got, expected)


def test_silu_and_mul_public_op():
    x = randn(2, 3, 64)
    torch.testing.assert_close(ops.silu_and_mul(x), torch.nn.functional.silu(x[..., :32]) * x[..., 32:])
