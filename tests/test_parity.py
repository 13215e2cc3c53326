"""Our forward pass against transformers' own implementation on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ttsearch import Engine
from ttsearch.models.loader import resolve_model_path

TOL = 1e-3
PROMPT_LEN = 50
DECODE_STEPS = 20


def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def check_parity(engine: Engine, hf_model, prompt: list[int]) -> None:
    """Logits after the prompt and after each of 20 greedy decode steps match the
    reference's logits at the same positions of one full forward."""
    seq = engine.add(prompt)
    ours = [engine.logits(seq)]
    for _ in range(DECODE_STEPS):
        engine.step([seq])
        ours.append(engine.logits(seq))
    ref = reference_logits(hf_model, seq.token_ids)
    ref = ref[PROMPT_LEN - 1 :]
    diff = (torch.stack(ours) - ref).abs().max().item()
    assert diff <= TOL, f"max |logit difference| {diff:.2e} > {TOL}"
    engine.free(seq)


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_tiny_checkpoint_logits_match_transformers(tiny_checkpoints, kind):
    path = tiny_checkpoints[kind]
    engine = Engine(str(path), dtype="float32", kv_cache_bytes=8 << 20, progress=False)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, engine.config.vocab_size, (PROMPT_LEN,), generator=generator).tolist()
    check_parity(engine, hf_model, prompt)


@pytest.fixture(scope="module")
def smollm2_hf():
    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2_engine_fp32, smollm2_hf):
    tok = smollm2_engine_fp32.tokenizer
    text = "The history of mathematics spans many cultures. " * 12
    prompt = tok.encode(text, add_special_tokens=False)[:PROMPT_LEN]
    assert len(prompt) == PROMPT_LEN
    check_parity(smollm2_engine_fp32, smollm2_hf, prompt)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2_engine_fp32, smollm2_hf):
    engine = smollm2_engine_fp32
    messages = [{"role": "user", "content": "What is 15 + 27? Explain step by step."}]
    prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        expected = smollm2_hf.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )[0, len(ids) :].tolist()
    seq = engine.add(ids)
    ours = [engine.step([seq])[0] for _ in range(32)]
    engine.free(seq)
    assert ours == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
@pytest.mark.parametrize("in_features, out_features, bias", [(576, 960, False), (576, 1536, False), (1536, 576, False),
                                                           (64, 320, True), (48, 40, True)])
def test_model_linear_matches_a_float64_product(rows, in_features, out_features, bias, dtype):
    """The model's Linear (oneDNN's packed GEMM where torch has it: float32 always, bfloat16
    where the CPU multiplies it in hardware) against float64 on the same rounded operands."""
    from ttsearch.ops.cpu_isa import has_fast_bf16
    from ttsearch.models.llama import Linear

    g = torch.Generator().manual_seed(rows + in_features)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    wide = torch.randn(rows, in_features + 8, generator=g).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    for x in (wide[:, :in_features].contiguous(), wide[:, 8:]):  # contiguous and strided rows
        linear = Linear(weight, b)
        if torch.backends.mkldnn.is_available():
            assert (linear.packed is not None) == (dtype == torch.float32 or has_fast_bf16())
        expected = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
        torch.testing.assert_close(linear(x).double(), expected, atol=tol, rtol=tol)
