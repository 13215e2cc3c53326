"""GGUF's quantized block formats: our torch dequantization against the gguf package's own
(bit for bit), the rounding of x to int8 groups that the op's contract fixes, and
``quantized_linear`` on the C++ kernel against that reference over the formats, shapes,
batch sizes and dtypes (both its paths: int8 dot products in registers for up to 8 rows,
a dequantized panel and ATen's GEMM for more).

Random blocks make every bit pattern of the quantized values appear; the fp16 scales are
drawn small and finite, as a quantizer writes them."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

# Triton fixes a function's mode when it is decorated: the interpreter must be on before the
# first import of triton (the ``impl`` fixture swaps in an interpreted twin if it was not).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ttsearch.ops as ops  # noqa: E402
from ttsearch.ops import cpu_isa, quantized  # noqa: E402

HAS_CPP = ops.IMPLEMENTATIONS["cpu"].startswith("cpp")
try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ttsearch.kernels import quantized_linear as triton_module
except ImportError:
    triton_module = None
NEEDS = {"cpp": pytest.mark.skipif(not HAS_CPP, reason="ttsearch._C is not loaded"),
         "triton": pytest.mark.skipif(triton_module is None, reason="triton is not importable")}
# rows: one decode sequence, a few (the C++ kernel's fused path up to 4 rows, or 8 without
# AVX512-VNNI), more (its GEMM: one tile of 8 rows part filled and full, one of 16 part filled
# and full, three with the last part filled); the interpreter is slow, and one row and many
# cover the Triton tiles
CASES = [pytest.param(impl, rows, marks=NEEDS[impl], id=f"{impl}-{rows}")
         for impl, all_rows in (("cpp", (1, 3, 5, 8, 9, 16, 40)), ("triton", (1, 40))) for rows in all_rows]
FORMATS = list(quantized.FORMATS)
# where each format keeps its fp16 scales (and mins)
SCALE_OFFSETS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "q4_K": [0, 2], "q6_K": [208]}
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}  # (atol, rtol)


def random_blocks(out_features: int, in_features: int, qtype: str, seed: int = 0) -> torch.Tensor:
    fmt = quantized.FORMATS[qtype]
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (out_features, in_features // fmt.elems, fmt.bytes), dtype=torch.uint8, generator=g)
    for offset in SCALE_OFFSETS[qtype]:
        scale = (torch.rand(out_features, in_features // fmt.elems, generator=g) * 0.04 - 0.02).half()
        blocks[..., offset:offset + 2] = scale.view(torch.uint8).reshape(out_features, -1, 2)
    return blocks.reshape(out_features, -1)


def gguf_type(qtype: str):
    return getattr(gguf.GGMLQuantizationType, qtype.upper() if qtype[-1] != "K" else qtype[:-1].upper() + "K")


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("shape", [(1, 256), (7, 512), (33, 768)])
def test_dequantize_matches_the_gguf_package_bit_for_bit(qtype, shape):
    blocks = random_blocks(*shape, qtype)
    want = gguf_dequantize(blocks.numpy(), gguf_type(qtype)).reshape(shape)
    np.testing.assert_array_equal(quantized.dequantize(blocks, qtype).numpy(), want)


def kernel(impl: str, monkeypatch):
    """The kernel under test: "cpp" through the dispatcher, or the Triton launcher (through
    Triton's interpreter on a CPU-only machine)."""
    if impl == "cpp":
        return ops.quantized_linear
    if not HAS_CUDA:  # triton imported before this file set TRITON_INTERPRET: interpreted twins
        for module in (tl, tl.standard, triton_module):
            for name, fn in list(vars(module).items()):
                if isinstance(fn, JITFunction):
                    monkeypatch.setattr(module, name, InterpretedFunction(fn.fn))
    device = "cuda" if HAS_CUDA else "cpu"
    return lambda x, blocks, qtype: triton_module.quantized_linear(x.to(device), blocks.to(device), qtype).cpu()


TIES = torch.tensor([127.0, 2.5, 3.5, -2.5, 1.4, -0.6, *[0.0] * 26])  # max 127: d = 1, and three ties


def test_x_is_rounded_to_int8_groups_of_32_ties_to_even():
    x = torch.stack([torch.cat([TIES, 0.5 * TIES]), torch.zeros(64)])  # the second group: d = 0.5
    rounded = torch.tensor([127.0, 2.0, 4.0, -2.0, 1.0, -1.0, *[0.0] * 26])
    assert torch.equal(quantized.round_groups(x), torch.stack([torch.cat([rounded, 0.5 * rounded]), torch.zeros(64)]))


@pytest.mark.skipif(not HAS_CPP, reason="ttsearch._C is not loaded")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
@pytest.mark.parametrize("rows", [2, 12])  # the fused path, and the GEMM's
def test_the_kernel_rounds_x_as_the_contract_says(qtype, rows):
    """With a diagonal W, output feature f is w_ff times x_f rounded: a kernel rounding a tie
    the other way, or by another scale, is off by w_ff / 127 of the group's largest value."""
    eye = torch.eye(64)
    blocks = torch.from_numpy(gguf.quants.quantize(eye.numpy(), gguf_type(qtype)))
    diagonal = quantized.dequantize(blocks, qtype).diagonal()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(5)) * 3
    x[0] = torch.cat([TIES, -TIES])
    torch.testing.assert_close(ops.quantized_linear(x, blocks, qtype), quantized.round_groups(x) * diagonal,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl, rows", CASES)
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernels_match_the_reference(impl, rows, qtype, dtype, monkeypatch):
    # 480 features: 15 groups of 32, an odd count (the AVX-512 kernel takes groups in pairs);
    # 100 outputs: the int8 GEMM's strips of 8 end in a part-filled one
    in_features = 480 if quantized.FORMATS[qtype].elems == 32 and rows % 2 else 512
    out_features = 100 if rows > 4 else 96
    blocks = random_blocks(out_features, in_features, qtype, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kernel(impl, monkeypatch)(x, blocks, qtype)
    want = quantized.quantized_linear(x, blocks, qtype)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol * want.abs().max().item(), rtol=rtol)


@pytest.mark.skipif(not (HAS_CPP and cpu_isa.multiplies_int8(ops.IMPLEMENTATIONS["cpu"].removeprefix("cpp-"))),
                    reason="the int8 GEMM is built on the avx512_bf16 level (AVX512-VNNI) only")
@pytest.mark.parametrize("qtype", FORMATS)
def test_a_row_through_the_int8_gemm_is_the_same_in_any_batch(qtype):
    """Past the fused kernel's 8 rows, and from 5 rows on: tiles of 8 rows (ymm) and of 16
    (zmm) compute each row alike, so a row's result does not depend on its batch."""
    blocks = random_blocks(100, 512, qtype, seed=3)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    whole = ops.quantized_linear(x, blocks, qtype)
    for rows in (5, 8, 9, 16, 17):
        assert torch.equal(ops.quantized_linear(x[:rows], blocks, qtype), whole[:rows]), rows


@pytest.mark.skipif(not HAS_CPP, reason="ttsearch._C is not loaded")
def test_leading_dims_and_a_strided_input_are_taken_as_rows():
    blocks = random_blocks(64, 256, "q8_0")
    x = torch.randn(2, 3, 512)[..., ::2]  # [2, 3, 256], not contiguous
    want = quantized.quantized_linear(x.reshape(6, 256), blocks, "q8_0").reshape(2, 3, 64)
    torch.testing.assert_close(ops.quantized_linear(x, blocks, "q8_0"), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(qtype="q3_K"), "qtype 'q3_K': expected one of q4_0"),
    (dict(blocks=torch.zeros(8, 30, dtype=torch.uint8)), r"blocks: expected uint8 \[out_features, a multiple of 20"),
    (dict(blocks=torch.zeros(8, 40, dtype=torch.int8)), "blocks: expected uint8"),
    (dict(x=torch.zeros(2, 63)), r"x: expected \[..., 64\] for these q4_1 blocks, got \(2, 63\)"),
    (dict(x=torch.zeros(2, 64, dtype=torch.int32)), "x: expected a float32, bfloat16 or float16 input"),
])
def test_bad_arguments_are_named(change, message):
    args = dict(x=torch.zeros(2, 64), blocks=torch.zeros(8, 40, dtype=torch.uint8), qtype="q4_1") | change
    with pytest.raises(ValueError, match=message):
        ops.quantized_linear(**args)


# ----------------------------------------------------------------------------- SmolLM2's Q4_1 file, packed


def test_packed_loading_keeps_the_files_blocks_and_rejects_an_unknown_choice():
    from ttsearch.models.loader import load_checkpoint
    from ttsearch.ops.quantized import QuantizedTensor

    weights = load_checkpoint("smollm2-135m", progress=False, weights="packed").weights
    formats = {name: w.qtype for name, w in weights.items() if isinstance(w, QuantizedTensor)}
    assert formats["model.embed_tokens.weight"] == "q8_0"
    assert {formats[f"model.layers.0.{part}.weight"] for part in ("self_attn.q_proj", "mlp.down_proj")} == {"q4_1"}
    assert weights["model.norm.weight"].dtype == torch.float32  # the file's float32 tensors stay plain
    with pytest.raises(ValueError, match="weights='int4': expected one of packed, dequantized"):
        load_checkpoint("smollm2-135m", progress=False, weights="int4")


#: the logit differences packed weights may make on SmolLM2 in float32, over the vocabulary and
#: on the five likeliest tokens of each step: x rounded to int8 groups in every linear layer,
#: as llama.cpp rounds it, where the dequantized path multiplies x as it is. Measured on the
#: prompts below: at most 1.50 and 0.56, with the top logit at 18-40.
LOGIT_ERROR, TOP5_LOGIT_ERROR = 2.0, 0.75


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPP, reason="ttsearch._C is not loaded")
def test_smollm2_packed_decodes_as_its_dequantized_twin_in_float32(smollm2_engine_fp32):
    """Same file, float32, greedy for 32 steps on two prompts, with the weights held in under a
    fifth of the bytes: the logits within the bounds above, and the tokens equal until the
    dequantized path's top two are closer than twice TOP5_LOGIT_ERROR: a near tie, which the
    rounding of x may break either way. Prints the figures."""
    from ttsearch import GREEDY, Engine

    engines = {"dequantized": smollm2_engine_fp32,
               "packed": Engine("smollm2-135m", dtype="float32", weights="packed", kv_cache_bytes=64 << 20,
                                progress=False)}
    assert engines["packed"].model.weight_bytes < 0.2 * engines["dequantized"].model.weight_bytes
    tok = engines["packed"].tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
               for q in ("What is 12 * 7 + 5?", "Solve step by step: 48 / 6 - 3 = ?")]
    for i, prompt in enumerate(prompts):
        seqs = {w: e.add(prompt) for w, e in engines.items()}
        error = top5_error = 0.0
        same = 0
        for step in range(32):
            want, got = engines["dequantized"].logits(seqs["dequantized"]), engines["packed"].logits(seqs["packed"])
            error = max(error, (got - want).abs().max().item())
            top5_error = max(top5_error, (got - want)[want.topk(5).indices].abs().max().item())
            assert error < LOGIT_ERROR and top5_error < TOP5_LOGIT_ERROR, (i, step, error, top5_error)
            for w, e in engines.items():
                e.step([seqs[w]], GREEDY)
            if seqs["packed"].token_ids[-1] != seqs["dequantized"].token_ids[-1]:
                top2 = want.topk(2).values
                assert top2[0] - top2[1] < 2 * TOP5_LOGIT_ERROR, f"prompt {i} diverged at step {step}: {top2}"
                print(f"prompt {i}: diverged at step {step}, where the dequantized top two were "
                      f"{(top2[0] - top2[1]).item():.2f} apart")
                break
            same += 1
        print(f"prompt {i}: max logit difference {error:.2f} (five likeliest tokens: {top5_error:.2f}), "
              f"greedy tokens equal for {same} of 32 steps")
        for w, e in engines.items():
            e.free(seqs[w])


def test_auto_weights_are_packed_where_the_int8_gemm_runs_and_amx_does_not(monkeypatch):
    from ttsearch.engine import engine as engine_module
    from ttsearch.engine.engine import resolve_weights

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(engine_module, "has_amx", lambda: False)
    for implementation, want in (("cpp-avx512_bf16", "packed"), ("cpp-avx512", "dequantized"),
                                 ("cpp-avx2", "dequantized"), ("reference", "dequantized")):
        monkeypatch.setitem(ops.IMPLEMENTATIONS, "cpu", implementation)
        assert resolve_weights("auto", cpu) == want, implementation
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cpu", "cpp-avx512_bf16")
    assert resolve_weights("auto", cuda) == "dequantized"
    monkeypatch.setattr(engine_module, "has_amx", lambda: True)
    assert resolve_weights("auto", cpu) == "dequantized"
    assert resolve_weights("packed", cuda) == "packed" and resolve_weights("dequantized", cpu) == "dequantized"
    with pytest.raises(ValueError, match="weights='int4': expected one of auto, packed, dequantized"):
        resolve_weights("int4", cpu)
