"""Shared fixtures: tiny real checkpoints written by transformers, and SmolLM2 loaded once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Step 1: 12 * 7 = 84.\n\nStep 2: 84 + 5 = 89.\n\nThe answer is \\boxed{89}.",
    "Let x be the number of apples. Then 3x + 2 = 11, so x = 3.\n\n",
    "We compute the sum 1 + 2 + 3 + 4 = 10, and then divide by 2 to get 5.\n\n",
    "The quick brown fox jumps over the lazy dog. Answer: 42\n\n",
]


def write_tokenizer(directory: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with chat tokens, saved in transformers' format."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(directory)
    return fast


TINY_CONFIGS = {
    "llama3": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        architectures=["Qwen2ForCausalLM"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}


def write_tiny_checkpoint(directory: Path, kind: str, seed: int = 0) -> Path:
    """A random-weight model of ``kind`` saved by transformers itself (config.json +
    model.safetensors + tokenizer files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(directory)
    fields = dict(TINY_CONFIGS[kind])
    model_type = fields.pop("model_type")
    fields.pop("architectures")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so logits differ visibly
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: write_tiny_checkpoint(root / kind, kind) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm2_engine_fp32():
    """SmolLM2 as transformers runs it: float32, its GGUF weights dequantized (packed weights,
    the default on some CPUs, round activations to int8)."""
    from ttsearch import Engine

    return Engine("smollm2-135m", dtype="float32", weights="dequantized", kv_cache_bytes=256 << 20, progress=False)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
