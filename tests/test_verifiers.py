"""Verifiers on tiny random-weight checkpoints saved in each PRM's real format, against a plain
full-text forward of the published scoring code (transformers where it has the architecture,
transformers' decoder plus the head in torch where it has not)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
)

from ttsearch import Engine, SamplingParams
from ttsearch.errors import ModelLoadError
from ttsearch.models.llama import Linear
from ttsearch.verifiers import ArithmeticChecker, ModelPRM, SelfVerifier, load_verifier
from ttsearch.verifiers.arithmetic import MAX_CHARS, check, equations

TOL = 1e-4
KV = 8 << 20
QUESTION = "Janet has 16 eggs and eats 3 of them. How many eggs are left?"
STEPS = [
    "Step 1: Janet starts with 16 eggs.\n\n",
    "Step 2: She eats 3, so 16 - 3 = 13.\nThat leaves 13 eggs.\n\n",
    "The answer is 13.",
]
CORPUS = [
    QUESTION + " " + "".join(STEPS),
    "Step 1: 12 * 7 = 84. ки\n\nStep 2: 84 + 5 = 89. ки\n\nThe answer is 89. ки",
    "Is this step correct? Answer yes or no. yes no yes no Yes No",
    "+ - + - ки ки yes no",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'()*/=+-",
]
ALPHABET = sorted(set("".join(CORPUS)) | {"\n", " "})
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# --------------------------------------------------------------------------------------------- checkpoints


def byte_level_tokenizer(special: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """Byte-level BPE (Llama 3 / Qwen2 style) with the given special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=420, show_progress=False, special_tokens=special, initial_alphabet=alphabet
    )
    tok.train_from_iterator(CORPUS * 8, trainer)
    bos = kwargs.get("bos_token")
    if kwargs.pop("add_bos", False):
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """Mistral/Llama-2 style: a "▁" marks a word start (and the start of the text), newlines are
    tokens of their own, <s> is added by encode."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(prepend_scheme="first")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420, show_progress=False, special_tokens=special, initial_alphabet=ALPHABET
    )
    tok.train_from_iterator(CORPUS * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def widen(model: torch.nn.Module, seed: int) -> None:
    """Random init is tiny; widen it so that scores differ visibly from 0.5."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)


def save_causal_lm(directory: Path, config, tokenizer, seed: int = 0):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widen(model, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model.eval()


def save_prm(directory: Path, architecture: str, head: dict[str, torch.Tensor], tokenizer, seed: int = 0, **config):
    """A PRM checkpoint as the published ones are laid out: the Qwen2 decoder under ``model.``,
    the head tensors by their published names, config.json naming the architecture."""
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, **TINY, **config)
    base = Qwen2Model(config)
    widen(base, seed)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()} | head
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    config.architectures = [architecture]
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, base.eval()


@pytest.fixture(scope="module")
def math_shepherd(tmp_path_factory):
    tok = sentencepiece_like_tokenizer()
    config = MistralConfig(vocab_size=len(tok), max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, **TINY)
    config.architectures = ["MistralForCausalLM"]
    return save_causal_lm(tmp_path_factory.mktemp("ms"), config, tok)


@pytest.fixture(scope="module")
def rlhflow(tmp_path_factory):
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = byte_level_tokenizer(special, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_bos=True)
    tok.chat_template = LLAMA31_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=1024,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **TINY,
    )
    config.architectures = ["LlamaForCausalLM"]
    return save_causal_lm(tmp_path_factory.mktemp("rlhflow"), config, tok, seed=1)


def qwen_tokenizer(**kwargs):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
    tok = byte_level_tokenizer(special, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs)
    tok.chat_template = QWEN_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen_prm(tmp_path_factory):
    torch.manual_seed(2)
    h = TINY["hidden_size"]
    head = {
        "score.0.weight": torch.randn(h, h) * 0.3,
        "score.0.bias": torch.randn(h) * 0.1,
        "score.2.weight": torch.randn(2, h) * 0.3,
        "score.2.bias": torch.randn(2) * 0.1,
    }
    # the directory's name says Math-Shepherd: the family must come from the files
    directory = tmp_path_factory.mktemp("math-shepherd")
    path, base = save_prm(directory, "Qwen2ForProcessRewardModel", head, qwen_tokenizer(), seed=2)
    return path, base, head


@pytest.fixture(scope="module")
def skywork(tmp_path_factory):
    torch.manual_seed(3)
    h = TINY["hidden_size"]
    head = {"v_head.summary.weight": torch.randn(1, h) * 0.3, "v_head.summary.bias": torch.randn(1) * 0.1}
    tok = qwen_tokenizer(bos_token="<|endoftext|>")
    directory = tmp_path_factory.mktemp("sky")
    path, base = save_prm(directory, "Qwen2ForPrmModel", head, tok, seed=3, tie_word_embeddings=True)
    return path, base, head


def forward(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].float()


def prm(path, **kwargs) -> ModelPRM:
    return load_verifier(str(path), dtype="float32", kv_cache_bytes=KV, progress=False, **kwargs)


def score_one_by_one(verifier, steps=STEPS):
    """Score ``steps`` on one state; the scores and the tokens each step forwarded."""
    state = verifier.new(QUESTION)
    forwarded = [verifier.engine.stats()["tokens_forwarded"]]
    for step in steps:
        verifier.score([state], [step])
        forwarded.append(verifier.engine.stats()["tokens_forwarded"])
    deltas = [b - a for a, b in zip(forwarded, forwarded[1:])]
    return state, deltas


# --------------------------------------------------------------------------------------------- published formats


def test_math_shepherd_steps_equal_the_model_card_full_text(math_shepherd):
    path, hf = math_shepherd
    verifier = prm(path)
    assert isinstance(verifier, ModelPRM) and type(verifier.format).__name__ == "TaggedFormat"
    state, deltas = score_one_by_one(verifier)

    # search-and-learn's MathShepherd.score / the model card, verbatim
    tok = verifier.engine.tokenizer
    candidates = tok.encode("+ -")[1:]
    tag_id = tok.encode("ки")[-1]
    output = "".join(STEPS).replace("\n\n", " ки\n\n")
    output = output + " ки" if output[-2:] != "\n\n" else output
    ids = tok.encode(f"{QUESTION} {output}")
    ref = forward(hf, ids)[:, candidates].softmax(-1)[:, 0][torch.tensor(ids) == tag_id]
    torch.testing.assert_close(torch.tensor(state.step_scores), ref, atol=TOL, rtol=0)
    assert 0.05 < ref.min() and ref.max() < 0.95 and ref.std() > 0.01

    # each step forwarded exactly its own tokens up to its tag: what lies between two tags
    tags = [i for i, t in enumerate(ids) if t == tag_id]
    assert deltas == [b - a for a, b in zip([len(tok.encode(QUESTION)) - 1, *tags], tags)]


def test_rlhflow_chat_turns_equal_the_published_per_turn_scoring(rlhflow):
    path, hf = rlhflow
    verifier = prm(path)
    assert type(verifier.format).__name__ == "ChatTurnsFormat"
    state, deltas = score_one_by_one(verifier)

    # search-and-learn's RLHFFlow._score_single, verbatim but for tokenizing the rendered chat
    tok = verifier.engine.tokenizer
    candidates = [tok.encode("+")[-1], tok.encode("-")[-1]]
    conversation, ref, reads = [], [], []
    for k, step in enumerate(s.rstrip("\n") for s in STEPS):
        text = QUESTION + " " + step if k == 0 else step
        conversation += [{"content": text, "role": "user"}, {"content": "+", "role": "assistant"}]
        ids = tok.encode(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
        ref.append(forward(hf, ids)[-3, candidates].softmax(-1)[0])
        reads.append(len(ids) - 3)
    torch.testing.assert_close(torch.tensor(state.step_scores), torch.stack(ref), atol=TOL, rtol=0)
    # a step forwards the previous "+<|eot_id|>", its user turn and the assistant header
    prefix_len = len(state.seq) - sum(deltas)
    assert deltas == [b - a for a, b in zip([prefix_len - 1, *reads], reads)]


def test_qwen_prm_separators_equal_the_model_card(qwen_prm):
    path, base, head = qwen_prm
    verifier = prm(path)  # family from config.json, not from the directory's name
    assert type(verifier.format).__name__ == "SeparatorFormat" and verifier.engine.config.head == "classifier"
    state, deltas = score_one_by_one(verifier)

    tok = verifier.engine.tokenizer
    messages = [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "<extra_0>".join(s.strip() for s in STEPS) + "<extra_0>"},
    ]
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    hidden = forward(base, ids)
    logits = torch.relu(hidden @ head["score.0.weight"].T + head["score.0.bias"]) @ head["score.2.weight"].T
    probs = (logits + head["score.2.bias"]).softmax(-1)[:, 1]
    separators = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<extra_0>")]
    torch.testing.assert_close(torch.tensor(state.step_scores), probs[separators], atol=TOL, rtol=0)
    prefix = tok.encode(tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True))
    assert deltas == [b - a for a, b in zip([len(prefix) - 1, *separators], separators)]


def test_a_text_in_the_prms_format_reads_back_into_its_question_and_steps(math_shepherd, qwen_prm):
    """What ``POST /pooling`` takes: a text the client wrote in the PRM's format, cut at its tags
    into the steps the verifier scores, with the verifier's tokens equal to the text's."""
    from ttsearch.verifiers.path_scorer import PathScorer
    from ttsearch.verifiers.tagged_text import read_solution, read_text, step_tag

    # Math-Shepherd: the model card's f"{question} {output}", encoded with the tokenizer's <s>
    verifier = prm(math_shepherd[0])
    output = "".join(STEPS).replace("\n\n", " ки\n\n") + " ки"
    chat = read_solution(verifier, QUESTION, output)
    assert (chat.question, chat.steps) == (QUESTION, STEPS)
    text = read_text(verifier, f"{QUESTION} {output}")
    assert text.tokens == chat.tokens == len(verifier.engine.tokenizer.encode(f"{QUESTION} {output}"))
    assert f"{text.question} {''.join(text.steps)}" == f"{QUESTION} {''.join(STEPS)}"  # the space is the joint
    state, _ = score_one_by_one(verifier)
    scored = PathScorer(verifier).score(text.question, [text.steps]).step_scores[0]
    torch.testing.assert_close(torch.tensor(scored), torch.tensor(state.step_scores), atol=TOL, rtol=0)
    verifier.free(state)
    with pytest.raises(ValueError, match="add_special_tokens=False: the verifier writes its text with"):
        read_text(verifier, f"{QUESTION} {output}", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"step 2 .*not written as the verifier writes it"):
        read_text(verifier, f"{QUESTION} {output}".replace("13 eggs. ки", "13 eggs.ки"))

    # Qwen2.5-Math-PRM: the model card's whole conversation; the turn's end after the last separator is no step
    verifier = prm(qwen_prm[0])
    assert step_tag(verifier) == "<extra_0>"
    content = "<extra_0>".join(s.strip() for s in STEPS) + "<extra_0>"
    messages = [{"role": "system", "content": verifier.format.system_prompt}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": content}]
    whole = verifier.engine.tokenizer.apply_chat_template(messages, tokenize=False)
    text, chat = read_text(verifier, whole), read_solution(verifier, QUESTION, content)
    assert (text.question, text.steps) == (chat.question, chat.steps) == (QUESTION, [s.strip() for s in STEPS])
    assert text.tokens == len(verifier.engine.tokenizer.encode(whole[: whole.rindex("<extra_0>") + 9]))
    with pytest.raises(ValueError, match="does not start as the PRM's prompt does"):
        read_text(verifier, whole.replace("Please reason", "Reason"))
    with pytest.raises(ValueError, match="marks no step with a tag"):
        step_tag(ArithmeticChecker())


def test_skywork_value_head_equals_prepare_input(skywork):
    path, base, head = skywork
    verifier = prm(path)
    assert type(verifier.format).__name__ == "LineStepFormat" and verifier.engine.config.head == "value"
    state, deltas = score_one_by_one(verifier)

    # Skywork's prepare_input (io_utils.py), verbatim
    tok = verifier.engine.tokenizer
    prompt_ids = tok.encode(tok.bos_token + QUESTION + "\n")
    step_token_id = tok.encode("\n")[-1]
    ids, flags = list(prompt_ids), [0] * len(prompt_ids)
    for step in "".join(STEPS).split("\n"):
        step_ids = (tok.encode(step) if step != "" else []) + [step_token_id]
        ids += step_ids
        flags += [0] * (len(step_ids) - 1) + [1]
    rewards = torch.sigmoid(forward(base, ids) @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"])
    # the published code scores every line; a step's score is its last line's
    # lines: step 1 ("...", ""), step 2 ("...", "...", ""), step 3 ("...")
    flagged = [i for i, flag in enumerate(flags) if flag]
    ends = [flagged[1], flagged[4], flagged[5]]
    torch.testing.assert_close(torch.tensor(state.step_scores), rewards[ends], atol=TOL, rtol=0)
    assert deltas == [b - a for a, b in zip([len(prompt_ids) - 1, *ends], ends)]


def test_self_verification_reads_yes_no_after_the_suffix_on_a_fork(rlhflow):
    path, hf = rlhflow
    policy = Engine(str(path), dtype="float32", kv_cache_bytes=KV, progress=False)
    verifier = load_verifier("self", policy, aggregation="mean")
    assert isinstance(verifier, SelfVerifier)
    tok = policy.tokenizer
    question = [{"role": "user", "content": QUESTION}]
    prompt = tok.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    beams = [policy.add(tok.encode(prompt, add_special_tokens=False)) for _ in range(2)]
    steps = STEPS[:2]
    for beam, step in zip(beams, steps):
        policy.append(beam, tok.encode(step, add_special_tokens=False))
    states = [verifier.new(QUESTION, beam) for beam in beams]
    before, logits_before = policy.stats(), [policy.logits(b) for b in beams]

    scores = verifier.score(states, steps, policy_seqs=beams)

    after = policy.stats()
    suffix = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nIs this step correct? Answer yes or no.<|eot_id|>"
    suffix += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    suffix_ids = tok.encode(suffix, add_special_tokens=False)
    assert verifier.suffix_ids == suffix_ids
    assert after["tokens_forwarded"] - before["tokens_forwarded"] == 2 * len(suffix_ids)
    assert (after["blocks_used"], after["sequences"]) == (before["blocks_used"], before["sequences"])
    yes, no = tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    for beam, score, logits in zip(beams, scores, logits_before):
        ref = forward(hf, beam.token_ids + suffix_ids)[-1, [yes, no]].softmax(-1)[0]
        assert abs(score - ref.item()) <= TOL
        assert torch.equal(policy.logits(beam), logits)  # the beam itself is untouched


# --------------------------------------------------------------------------------------------- readout, tree


@pytest.mark.parametrize("family", ["math_shepherd", "rlhflow", "qwen_prm", "skywork", "self"])
def test_no_full_vocabulary_logits_while_scoring(family, request, monkeypatch):
    checkpoint = request.getfixturevalue("rlhflow" if family == "self" else family)
    path = checkpoint[0]
    if family == "self":
        engine = Engine(str(path), dtype="float32", kv_cache_bytes=KV, progress=False)
        verifier, seq = load_verifier("self", engine), engine.add([5, 6, 7])
    else:
        verifier, seq = prm(path), None
    vocab = verifier.engine.config.vocab_size
    linear, model_linear = torch.nn.functional.linear, Linear.__call__

    def guard(x, out_features):
        if out_features >= vocab:
            raise AssertionError(f"full-vocabulary logits formed for {tuple(x.shape)} hidden states")

    def guarded(x, weight, bias=None):
        guard(x, weight.shape[0])
        return linear(x, weight, bias)

    def guarded_model_linear(self, x):
        guard(x, self.out_features)
        return model_linear(self, x)

    monkeypatch.setattr(torch.nn.functional, "linear", guarded)
    monkeypatch.setattr(Linear, "__call__", guarded_model_linear)
    if family == "qwen_prm":  # the checkpoint has no LM head at all
        assert verifier.engine.model.lm_head.shape[0] == 0
    else:
        with pytest.raises(AssertionError, match="full-vocabulary"):  # the guard catches the LM head
            verifier.engine.model.compute_logits(torch.zeros(1, TINY["hidden_size"]))
    state = verifier.new(QUESTION)
    verifier.score([state], [STEPS[0]], policy_seqs=[seq] if seq else None)
    assert 0 < state.step_scores[0] < 1


def test_verifier_states_fork_and_free_with_a_beam_search(math_shepherd, rlhflow):
    """A small beam search: a policy writes steps, a PRM on its own engine and self-verification
    score them, the best beams fork, the rest are freed. Afterwards no verifier block is held,
    and every surviving beam's scores equal scoring its whole text from scratch."""
    policy = Engine(str(rlhflow[0]), dtype="float32", kv_cache_bytes=KV, progress=False)
    verifier = prm(math_shepherd[0], aggregation="min")
    judge = load_verifier("self", policy)
    tok = policy.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )
    root, vroot = policy.add(prompt), verifier.new(QUESTION)
    beams = list(zip(policy.fork(root, 4), verifier.fork(vroot, 4), [[] for _ in range(4)]))
    policy.free(root), verifier.free(vroot)
    sampling = [SamplingParams(temperature=1.0, seed=s) for s in range(4)]
    for _ in range(3):
        results = policy.generate_step([b[0] for b in beams], sampling, max_tokens=6)
        texts = [r.text for r in results]
        verifier.score([b[1] for b in beams], texts)
        judged = [judge.new(QUESTION) for _ in beams]
        judge.score(judged, texts, policy_seqs=[b[0] for b in beams])
        for state in judged:
            judge.free(state)
        for (_, _, written), text in zip(beams, texts):
            written.append(text)
        best = sorted(beams, key=lambda b: -b[1].aggregate)[:2]
        for seq, state, _ in beams:
            if not any(seq is b[0] for b in best):
                policy.free(seq), verifier.free(state)
        beams = []
        for seq, state, written in best:
            beams += zip(policy.fork(seq, 2), verifier.fork(state, 2), [list(written), list(written)])
            policy.free(seq), verifier.free(state)
    assert verifier.engine.stats()["sequences"] == 4
    for seq, state, written in beams:
        fresh = score_one_by_one(prm(math_shepherd[0], aggregation="min"), written)[0]
        torch.testing.assert_close(torch.tensor(state.step_scores), torch.tensor(fresh.step_scores), atol=TOL, rtol=0)
        assert state.aggregate == pytest.approx(min(state.step_scores))
        policy.free(seq), verifier.free(state)
    for engine in (verifier.engine, policy):
        assert (engine.stats()["blocks_used"], engine.stats()["sequences"]) == (0, 0)


MIA = "Mia has 4 cards, gets 10 more, and then gives away 9. How many cards does Mia have now?"
PATHS = [
    # worked through: every equation true and grounded, the answer is the last result
    (["4 + 10 = 14\n\n", "14 - 9 = 5\n\n", "The answer is \\boxed{5}."], [1.0, 1.0, 1.0]),
    (["4 + 10 - 9 = 5, so the answer is 5."], [1.0]),
    # an answer not derived from every number of the question: not verified
    (["4 + 10 = 14\n\n", "The answer is \\boxed{14}."], [1.0, 0.5]),
    # an answer the path did not compute
    (["4 + 10 = 14\n\n", "14 - 9 = 5\n\n", "The answer is \\boxed{6}."], [1.0, 1.0, 0.0]),
    (["The answer is 5."], [0.0]),
    # a number from nowhere: neutral, and its result may then be used
    (["9 * 12 = 108\n\n", "108 - 4 = 104\n\n"], [0.5, 1.0]),
    # each occurrence of a number in the question is to be used
    (["7 * 9 = 63\n\n", "63 + 3 = 66\n\n", "The answer is \\boxed{66}."], [1.0, 1.0, 0.5], "What is 7 * 9 + 3 * 7?"),
    (["7 * 9 = 63\n\n", "3 * 7 = 21\n\n", "63 + 21 = 84\n\n", "The answer is \\boxed{84}."], [1.0] * 4,
     "What is 7 * 9 + 3 * 7?"),
    # a result dropped: 55 never feeds the answer
    (["5 * 11 = 55\n\n", "5 + 8 = 13\n\n", "The answer is \\boxed{13}."], [1.0, 1.0, 0.5], "What is 5 * 11 + 8?"),
    (["5 * 11 = 55\n\n", "55 + 8 = 63\n\n", "The answer is \\boxed{63}."], [1.0, 1.0, 1.0], "What is 5 * 11 + 8?"),
    # a false equation, and an answer after one
    (["4 + 10 = 15\n\n", "15 - 9 = 6\n\n"], [0.0, 1.0]),
    (["4 + 10 - 9 = 6. The answer is \\boxed{6}."], [0.0]),
    # nothing to judge; an answer that is not a number
    (["Let us count the cards.\n\n", "The answer is \\boxed{\\frac{a}{b}}."], [0.5, 0.5]),
]


@pytest.mark.parametrize("path", PATHS, ids=lambda v: repr(v[0])[:40])
def test_arithmetic_checker_follows_the_path(path):
    steps, expected, question = (*path, MIA)[:3]
    checker = ArithmeticChecker()
    state = checker.new(question)
    for step in steps:
        checker.score([state], [step])
    assert state.step_scores == expected


def test_arithmetic_checker_forks_keep_their_own_progress():
    checker = ArithmeticChecker(aggregation="min")
    root = checker.new(MIA)
    checker.score([root], ["4 + 10 = 14\n\n"])
    a, b = checker.fork(root, 2)
    checker.score([a, b], ["14 - 9 = 5\n\n", "The answer is \\boxed{14}."])
    checker.score([a], ["The answer is \\boxed{5}."])
    assert (a.step_scores, a.aggregate) == ([1.0, 1.0, 1.0], 1.0)
    assert (b.step_scores, b.aggregate) == ([1.0, 0.5], 0.5)
    assert root.context.last == 14 and a.context.last == 5


@pytest.mark.parametrize(
    "aggregation, expected",
    [("last", lambda s: s[-1]), ("min", min), ("prod", lambda s: s[0] * s[1] * s[2]), ("mean", lambda s: sum(s) / 3)],
)
def test_aggregations(qwen_prm, aggregation, expected):
    state, _ = score_one_by_one(prm(qwen_prm[0], aggregation=aggregation))
    assert state.aggregate == pytest.approx(expected(state.step_scores), abs=1e-6)
    checker = ArithmeticChecker(aggregation)
    state = checker.new(QUESTION)
    checker.score([state], ["16 - 3 = 13"]), checker.score([state], ["no equation"]), checker.score([state], ["2 = 3"])
    assert state.step_scores == [1.0, 0.5, 0.0]
    assert state.aggregate == pytest.approx(expected([1.0, 0.5, 0.0]))


def test_prm_on_the_policys_own_engine(math_shepherd):
    policy = Engine(str(math_shepherd[0]), dtype="float32", kv_cache_bytes=KV, progress=False)
    verifier = load_verifier(str(math_shepherd[0]), policy)
    assert verifier.engine is policy
    alone, _ = score_one_by_one(prm(math_shepherd[0]))
    shared, _ = score_one_by_one(verifier)
    assert shared.step_scores == pytest.approx(alone.step_scores, abs=TOL)
    with pytest.raises(ValueError, match="policy's engine"):
        load_verifier(str(math_shepherd[0]), policy, dtype="float32")


# --------------------------------------------------------------------------------------------- load errors


def test_tokenizer_without_the_needed_tokens_is_refused_at_load(math_shepherd, qwen_prm):
    with pytest.raises(ModelLoadError, match="candidates '\\+\\+\\+'/'-'.*two known tokens"):
        prm(math_shepherd[0], good="+++")
    with pytest.raises(ModelLoadError, match="step tag 'Ж' is not in the tokenizer's vocabulary"):
        prm(math_shepherd[0], tag="Ж")
    with pytest.raises(ModelLoadError, match="rlhflow format.*no chat template"):
        prm(math_shepherd[0], family="rlhflow")
    with pytest.raises(ModelLoadError, match="'<extra_9>' is not a single token"):
        prm(qwen_prm[0], separator="<extra_9>")
    with pytest.raises(ModelLoadError, match="skywork format.*no bos_token"):
        prm(qwen_prm[0], family="skywork")
    with pytest.raises(ModelLoadError, match="v_head.summary.weight' is missing"):
        prm(math_shepherd[0], family="skywork")
    with pytest.raises(ModelLoadError, match="reads the LM head"):
        prm(qwen_prm[0], family="math-shepherd")
    with pytest.raises(ValueError, match="family='orm'"):
        prm(qwen_prm[0], family="orm")
    with pytest.raises(ValueError, match="aggregation='max'"):
        load_verifier("arithmetic", aggregation="max")
    with pytest.raises(ValueError, match="needs the policy_engine"):
        load_verifier("self")


def test_state_misuse(qwen_prm):
    verifier = prm(qwen_prm[0])
    other = ArithmeticChecker()
    state = verifier.new(QUESTION)
    with pytest.raises(ValueError, match="belongs to another verifier"):
        other.score([state], ["1 = 1"])
    with pytest.raises(ValueError, match="appears twice"):
        verifier.score([state, state], ["a", "b"])
    with pytest.raises(ValueError, match="expected 1 step strings"):
        verifier.score([state], [])
    verifier.free(state)
    with pytest.raises(ValueError, match="was freed"):
        verifier.score([state], ["a"])
    with pytest.raises(ValueError, match="was freed"):
        verifier.fork(state, 2)
    assert verifier.engine.stats()["blocks_used"] == 0


# --------------------------------------------------------------------------------------------- arithmetic

ARITHMETIC = [
    # true
    ("Step 1: 12 * 7 = 84.\n\n", 1.0),
    ("We compute the sum 1 + 2 + 3 + 4 = 10, then halve it.", 1.0),
    ("2 × (3 + 4) = 14 = 7 × 2", 1.0),
    ("\\( 12 \\times 7 \\div 4 = 21 \\)", 1.0),
    ("0.1 + 0.2 = 0.3 and 1,000 + 2,500 = 3,500", 1.0),
    ("So: -(-(-3)) − 2 = -5", 1.0),
    ("10 / 3 = 3.33 (rounded)", 1.0),
    ("((1 + 2) = 3 (so 2 + 2 = 4)", 1.0),
    ("3 + 4 = 7\n7 * 2 = 14\n\n", 1.0),
    # false
    ("12 * 7 = 85", 0.0),
    ("2 + 2 = 4 and 3 + 3 = 7", 0.0),
    ("10 / 3 = 3", 0.0),
    ("division by zero: 5 / 0 = 0", 0.0),
    ("1 = 1 = 2", 0.0),
    # none, or nothing the parser can judge
    ("The answer is \\boxed{13}.", 0.5),
    ("Then 3x + 2 = 11, so x = 3.", 0.5),
    ("x - 2 = 5", 0.5),
    ("half of 20 = 10; 50% = 0.5; x^2 = 4; 2**3 = 8", 0.5),
    ("2 = ", 0.5),
    ("= 3 + ", 0.5),
    ("(1 + ) = 1 and 1 + * 2 = 3 and 2(3) = 6", 0.5),
    ("", 0.5),
    # adversarial
    ("9" * 40 + " + 1 = 1" + "0" * 40, 0.5),
    ("(" * 5000 + "1" + ")" * 5000 + " = 1", 0.5),
    ("-" * 5000 + "1 = 1", 0.5),
    (" * ".join(["999999999999999999999999999999"] * 200) + " = 0", 0.5),
    ("1/" * 3000 + "1 = 0", 0.5),
    ("1 = 1. " * 20_000, 1.0),
    ("1 = 1. " * 100 + "1 = 2", 1.0),  # past the 64th equation nothing is judged
    ("2 + 2 = 5 " + "x" * 1_000_000, 0.0),
    ("\x00\ud800 = ÷÷ ((( 1e309 = inf", 0.5),
]


@pytest.mark.parametrize("text, expected", ARITHMETIC, ids=lambda v: repr(v)[:30] if isinstance(v, str) else None)
def test_arithmetic_checker(text, expected):
    assert check(text) == expected, equations(text)
    # the work is bounded by the input bounds, not by the text: count calls, not seconds
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        check(text)
    finally:
        sys.setprofile(None)
    assert calls <= 3 * MAX_CHARS, calls


def test_arithmetic_equations_found():
    assert [(e.left, e.right, e.holds) for e in equations("Step 2: 16 - 3 = 13. 13 * 2 = 27")] == [
        ("16 - 3", "13", True),
        ("13 * 2", "27", False),
    ]
    checker = load_verifier("arithmetic", neutral=0.25)
    states = checker.fork(checker.new(QUESTION), 3)
    assert checker.score(states, ["16 - 3 = 13", "16 - 3 = 12", "no numbers"]) == [1.0, 0.0, 0.25]


def test_the_triton_kernel_numbers_the_aggregations_as_their_owner_names_them():
    """ttsearch.aggregation owns the names; the Triton kernel keeps a table of its own (by index)."""
    from ttsearch.aggregation import AGGREGATIONS

    kernels = pytest.importorskip("ttsearch.kernels.prm_step_score")
    assert tuple(kernels._AGGREGATIONS) == AGGREGATIONS
