"""The engine API on a tiny real checkpoint: forks, sharing, prefix reuse, sampling, steps."""

from __future__ import annotations

import pytest
import torch

from ttsearch import Engine, SamplingParams
from ttsearch.errors import ContextLengthError, InvalidTokenError, KVCacheFullError

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints):
    return str(tiny_checkpoints["llama3"])


def make_engine(path, **kwargs) -> Engine:
    kwargs.setdefault("kv_cache_bytes", 4 << 20)
    return Engine(path, dtype="float32", progress=False, **kwargs)


@pytest.fixture()
def engine(tiny_path):
    return make_engine(tiny_path)


@pytest.fixture(scope="module")
def fresh(tiny_path):
    """Logits of a sequence prefilled from scratch on a new engine (nothing cached)."""

    def logits_of(tokens: list[int]) -> torch.Tensor:
        ref = make_engine(tiny_path)
        return ref.logits(ref.add(tokens))

    return logits_of


def prompt(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def snapshot(engine: Engine, *seqs) -> tuple:
    return (engine.stats(), [(list(s.token_ids), list(s.block_table)) for s in seqs])


# ---------------------------------------------------------------------------- forks


def test_fork_child_continued_equals_fresh_sequence(engine, fresh):
    parent = engine.add(prompt(37))
    (child,) = engine.fork(parent, 1)
    x = prompt(9, seed=1)
    engine.append(child, x)
    torch.testing.assert_close(engine.logits(child), fresh(parent.token_ids + x), atol=ATOL, rtol=0)


def test_diverging_children_corrupt_neither_each_other_nor_the_parent(engine, fresh):
    base = prompt(21)  # 21 tokens: a shared partial tail that every child must copy
    parent = engine.add(base)
    parent_logits = engine.logits(parent)
    children = engine.fork(parent, 3)
    continuations = [prompt(n, seed=10 + n) for n in (1, 5, 30)]
    for child, x in zip(children, continuations):
        engine.append(child, x)
    for child, x in zip(children, continuations):
        torch.testing.assert_close(engine.logits(child), fresh(base + x), atol=ATOL, rtol=0)
    torch.testing.assert_close(engine.logits(parent), parent_logits, atol=0, rtol=0)
    engine.append(parent, [5, 6])
    torch.testing.assert_close(engine.logits(parent), fresh(base + [5, 6]), atol=ATOL, rtol=0)
    engine.blocks.check_invariants()


def test_batched_decode_equals_one_at_a_time(engine, tiny_path):
    lengths = [3, 16, 17, 40]
    seqs = [engine.add(prompt(n, seed=n)) for n in lengths]
    batched = [engine.step(seqs) for _ in range(5)]
    single = make_engine(tiny_path)
    for i, n in enumerate(lengths):
        seq = single.add(prompt(n, seed=n))
        alone = [single.step([seq])[0] for _ in range(5)]
        assert alone == [step[i] for step in batched]
        torch.testing.assert_close(single.logits(seq), engine.logits(seqs[i]), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- sharing


def test_hundred_token_prompt_forked_sixteen_ways_shares_its_blocks(engine):
    parent = engine.add(prompt(100))
    assert engine.stats()["blocks_used"] == 7  # ceil(100 / 16)
    children = engine.fork(parent, 16)
    assert engine.stats()["blocks_used"] == 7
    assert engine.stats()["tokens_held"] == 100
    engine.step(children)  # every child writes its own token: each copies only the partial tail
    stats = engine.stats()
    assert stats["tokens_held"] == 100 + 16 * 5  # each private tail: the 4 shared tokens + its own
    assert stats["blocks_used"] <= 7 + 16
    assert stats["kv_bytes_used"] == stats["blocks_used"] * engine.block_bytes
    assert stats["sequences"] == 17


def test_same_prompt_added_twice_forwards_only_the_uncached_tail(engine, fresh):
    tokens = prompt(100)
    first = engine.add(tokens)
    assert engine.stats()["tokens_forwarded"] == 100
    engine.free(first)
    assert engine.stats()["blocks_cached"] == 6 and engine.stats()["blocks_used"] == 0
    second = engine.add(tokens)
    assert engine.stats()["tokens_forwarded"] == 100 + 4  # 6 full blocks reused
    torch.testing.assert_close(engine.logits(second), fresh(tokens), atol=ATOL, rtol=0)
    engine.add(tokens + [7])  # live blocks are shared too
    assert engine.stats()["tokens_forwarded"] == 104 + 5
    assert engine.stats()["blocks_used"] == 7 + 1


def test_prompt_that_is_entirely_cached_still_gets_its_logits(engine, fresh):
    tokens = prompt(32)  # exactly two blocks
    engine.free(engine.add(tokens))
    seq = engine.add(tokens)
    assert engine.stats()["tokens_forwarded"] == 32 + 16  # the last block is recomputed
    torch.testing.assert_close(engine.logits(seq), fresh(tokens), atol=ATOL, rtol=0)


def test_free_releases_everything(engine):
    seq = engine.add(prompt(50))
    kids = engine.fork(seq, 4)
    engine.step(kids)
    for s in [seq, *kids]:
        engine.free(s)
    stats = engine.stats()
    assert stats["blocks_used"] == 0 and stats["kv_bytes_used"] == 0 and stats["sequences"] == 0
    engine.blocks.check_invariants()


# ---------------------------------------------------------------------------- sampling


def test_same_seed_same_tokens_and_forks_diverge(engine):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=7)
    runs = []
    for _ in range(2):
        root = engine.add(prompt(12))
        kids = engine.fork(root, 4)
        runs.append([engine.step(kids, sampling) for _ in range(6)])
        for s in [root, *kids]:
            engine.free(s)
    assert runs[0] == runs[1]
    per_child = list(zip(*runs[0]))
    assert len(set(per_child)) > 1, "forked children drew identical samples"


def test_a_sequences_samples_do_not_depend_on_its_batch(engine):
    sampling = SamplingParams(temperature=0.9, seed=3)
    alone = engine.add(prompt(10))
    alone_tokens = [engine.step([alone], sampling)[0] for _ in range(5)]
    engine.free(alone)
    seq = engine.add(prompt(10))
    other = engine.add(prompt(20, seed=5))
    batched = [engine.step([other, seq], [SamplingParams(temperature=0.5, seed=99), sampling])[1] for _ in range(5)]
    assert batched == alone_tokens


def test_a_batch_stepping_again_samples_its_logits_in_place_and_any_other_order_by_copy(engine):
    from ttsearch.engine.engine import _stacked_logits

    seqs = [engine.add(prompt(8, seed=s)) for s in range(3)]
    engine.step(seqs)  # one forward: their logits are consecutive rows of its output
    expected = torch.stack([engine.logits(s) for s in seqs])
    same_order = _stacked_logits(seqs)
    assert same_order.data_ptr() == seqs[0].last_logits.data_ptr(), "the batch's own rows were copied"
    torch.testing.assert_close(same_order.float(), expected)
    other_order = _stacked_logits([seqs[2], seqs[0]])
    torch.testing.assert_close(other_order.float(), expected[[2, 0]])
    assert engine.step([seqs[2], seqs[0]]) == expected[[2, 0]].argmax(-1).tolist()


def test_top_k_one_is_greedy(engine):
    a, b = engine.add(prompt(8)), engine.add(prompt(8))
    assert [engine.step([a], SamplingParams(temperature=2.0, top_k=1))[0] for _ in range(4)] == [
        engine.step([b])[0] for _ in range(4)
    ]


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"), ({"seed": 1.5}, "seed")],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# ---------------------------------------------------------------------------- steps


def test_generate_step_reports_length_stop_and_eos(engine):
    root = engine.add(prompt(10))
    probe = engine.fork(root, 1)[0]
    (free_run,) = engine.generate_step([probe], stop=None, max_tokens=6)
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 6
    tokens = free_run.token_ids

    # a delimiter that the third token completes: the step ends there and keeps it
    stop = engine.tokenizer.decode(tokens[:3])[-1]
    if stop in engine.tokenizer.decode(tokens[:2]):
        pytest.skip("the probe continuation repeats its characters")
    (stopped,) = engine.generate_step(engine.fork(root, 1), stop=stop, max_tokens=6)
    assert stopped.finish_reason == "stop" and stopped.token_ids == tokens[:3]
    assert stopped.text.endswith(stop)

    engine.eos_token_ids = frozenset({tokens[1]})
    if tokens[0] == tokens[1]:
        pytest.skip("the probe continuation repeats its first token")
    (ended,) = engine.generate_step(engine.fork(root, 1), stop=None, max_tokens=6)
    assert ended.finish_reason == "eos" and ended.token_ids == tokens[:2]


def test_generate_step_batch_stops_each_sequence_on_its_own(engine):
    seqs = [engine.add(prompt(n, seed=n)) for n in (5, 9)]
    results = engine.generate_step(seqs, stop=None, max_tokens=4)
    assert [len(r.token_ids) for r in results] == [4, 4]
    assert [len(s) for s in seqs] == [9, 13]


def test_generate_step_stops_at_the_context_length(tiny_path):
    engine = make_engine(tiny_path, max_model_len=20)
    seq = engine.add(prompt(17))
    (result,) = engine.generate_step([seq], stop=None, max_tokens=10)
    assert result.finish_reason == "length" and len(seq) == 20


def test_step_writer_lets_sequences_join_between_tokens(engine):
    root = engine.add(prompt(12))
    (alone,) = engine.generate_step(engine.fork(root, 1), stop=None, max_tokens=5)
    early, late = engine.fork(root, 2)
    writer = engine.step_writer(stop=None, max_tokens=5)
    writer.add([early])
    assert writer.advance() == [] and writer.advance() == []
    writer.add([late])  # joins after two tokens
    assert len(writer) == 2
    ended_at = {}
    for token in range(3, 8):
        for seq, result in writer.advance():
            ended_at[seq.seq_id] = (token, result.token_ids, result.finish_reason)
    # each ends after its own fifth token, having written what it writes alone
    assert ended_at == {early.seq_id: (5, alone.token_ids, "length"), late.seq_id: (7, alone.token_ids, "length")}
    assert len(writer) == 0 and writer.advance() == []


def test_step_writer_rejects_bad_input_and_keeps_its_batch(engine):
    seq = engine.add(prompt(8))
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got 0"):
        engine.step_writer(max_tokens=0)
    writer = engine.step_writer(stop=None, max_tokens=3)
    writer.add([seq])
    with pytest.raises(ValueError, match="already writing a step"):
        writer.add([engine.fork(seq, 1)[0], seq])
    assert len(writer) == 1
    (ended,) = writer.advance() + writer.advance() + writer.advance()
    assert ended[0] is seq and len(ended[1].token_ids) == 3


# ---------------------------------------------------------------------------- bad input


def test_token_outside_vocabulary(engine):
    seq = engine.add(prompt(5))
    before = snapshot(engine, seq)
    vocab = engine.config.vocab_size
    with pytest.raises(InvalidTokenError, match=rf"token id {vocab} at position 2 .*\[0, {vocab}\)"):
        engine.add([1, 2, vocab])
    with pytest.raises(InvalidTokenError, match="token id -1"):
        engine.append(seq, [4, -1])
    assert snapshot(engine, seq) == before


def test_prompt_over_the_context_length(tiny_path):
    engine = make_engine(tiny_path, max_model_len=64)
    seq = engine.add(prompt(60))
    before = snapshot(engine, seq)
    with pytest.raises(ContextLengthError, match="65 tokens, over the context length 64"):
        engine.add(prompt(65))
    with pytest.raises(ContextLengthError, match="65 tokens"):
        engine.append(seq, prompt(5))
    assert snapshot(engine, seq) == before


def test_pool_too_small(tiny_path):
    engine = make_engine(tiny_path, kv_cache_bytes=5 * 16 * 2 * 2 * 2 * 16 * 4)  # 5 blocks of 16 tokens
    assert engine.stats()["blocks_total"] == 5
    with pytest.raises(KVCacheFullError, match=r"needs 6 free blocks, 5 of 5 are free"):
        engine.add(prompt(90))
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["tokens_forwarded"] == 0
    seq = engine.add(prompt(47))  # 3 blocks, the last with one free slot
    kids = engine.fork(seq, 3)
    before = snapshot(engine, seq, *kids)
    with pytest.raises(KVCacheFullError, match="a decode step of 3 sequences"):
        engine.step(kids)  # three private tails needed, two blocks free
    assert snapshot(engine, seq, *kids) == before
    engine.free(kids[0])
    engine.step(kids[1:])  # now it fits


def test_misused_sequences(engine, tiny_path):
    seq = engine.add(prompt(5))
    other_engine = make_engine(tiny_path)
    stranger = other_engine.add(prompt(5))
    before = snapshot(engine, seq)
    with pytest.raises(ValueError, match="k must be a positive int"):
        engine.fork(seq, 0)
    with pytest.raises(ValueError, match="does not belong to this engine"):
        engine.step([stranger])
    with pytest.raises(ValueError, match="appears twice"):
        engine.step([seq, seq])
    with pytest.raises(ValueError, match="token_ids is empty"):
        engine.append(seq, [])
    assert snapshot(engine, seq) == before
    engine.free(seq)
    with pytest.raises(ValueError, match="was freed"):
        engine.append(seq, [1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"block_size": 0}, "block_size"),
        ({"kv_cache_bytes": 100}, "kv_cache_bytes=100 holds no block"),
        ({"max_model_len": -5}, "max_model_len"),
    ],
)
def test_bad_engine_settings(tiny_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(tiny_path, progress=False, **kwargs)


def test_append_batch_returns_hidden_states_at_the_asked_tokens(engine, fresh):
    a, b = engine.add(prompt(10)), engine.add(prompt(20, seed=2))
    xa, xb = prompt(4, seed=3), prompt(7, seed=4)
    hidden = engine.append_batch([a, b], [xa, xb], hidden_at=[[-1], [2, -1]])
    assert hidden.shape == (3, engine.config.hidden_size)
    logits = engine.model.compute_logits(hidden)
    torch.testing.assert_close(logits[0], engine.logits(a), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[2], engine.logits(b), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], fresh(prompt(20, seed=2) + xb[:3]), atol=ATOL, rtol=0)
    before = snapshot(engine, a, b)
    with pytest.raises(IndexError, match="hidden_at index 4 outside 4 new tokens"):
        engine.append_batch([a], [xa], hidden_at=[[4]])
    assert snapshot(engine, a, b) == before


def test_top_p_keeps_exactly_the_nucleus():
    from ttsearch.ops import reference

    probs = torch.softmax(torch.randn(3, 2000, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    probs[2] = 1 / 2000  # flat: the nucleus is wider than the candidates the fast path sorts
    for p in (0.5, 0.9):
        kept = reference.top_p_filter(probs, torch.tensor([p] * 3))
        for row in range(3):
            ordered = probs[row].sort(descending=True).values
            expected = int(((ordered.cumsum(0) - ordered) < p).sum())
            assert int((kept[row] > 0).sum()) == expected


def test_beams_sharing_a_prefix_decode_as_fresh_sequences(engine, fresh):
    """Decoding forked beams together takes the shared-prefix (cascade) path."""
    base = prompt(40)
    root = engine.add(base)
    beams = engine.fork(root, 4)
    tails = [prompt(n, seed=20 + n) for n in (1, 3, 16, 17)]
    for beam, tail in zip(beams, tails):
        engine.append(beam, tail)
    outsider = engine.add(prompt(25, seed=9))
    tokens = engine.step(beams + [outsider])
    for beam, tail, token in zip(beams, tails, tokens):
        torch.testing.assert_close(engine.logits(beam), fresh(base + tail + [token]), atol=ATOL, rtol=0)


def test_shared_prefix_tree_is_found_from_block_tables(engine):
    root = engine.add(prompt(40))  # blocks 0, 1 full; a partial third
    beams = engine.fork(root, 3)
    engine.step(beams)
    loner = engine.add(prompt(30, seed=3))
    engine.step(beams + [loner])
    tree = engine.runner.last_prefix_tree
    assert tree.nodes == [root.block_table[:2]]
    assert tree.paths == [[0], [0], [0], []]


def test_shared_prefix_tree_levels():
    from ttsearch.engine.prefix_tree import shared_prefix_tree

    # two problems on one system prompt (block 1); problem a's beams share a step (block 3)
    tables = [[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 4, 12], [1, 5, 6, 13], [1, 5, 7, 14], [8, 9]]
    tree = shared_prefix_tree(tables, [3, 3, 3, 3, 3, 1])
    nodes = {tuple(n): i for i, n in enumerate(tree.nodes)}
    assert set(nodes) == {(1,), (2,), (3,), (5,)}
    system, a, step, b = nodes[(1,)], nodes[(2,)], nodes[(3,)], nodes[(5,)]
    assert tree.paths == [[system, a, step], [system, a, step], [system, a], [system, b], [system, b], []]
    # a run shared by the same sequences is one node, not one per block
    tree = shared_prefix_tree([[1, 2, 3, 4], [1, 2, 3, 5]], [3, 3])
    assert tree.nodes == [[1, 2, 3]] and tree.paths == [[0], [0]]
    # only full blocks are shared: the block a sequence is writing never is
    tree = shared_prefix_tree([[1, 2], [1, 2]], [1, 1])
    assert tree.nodes == [[1]]


def test_decode_reads_each_shared_block_once_at_every_level(engine, fresh):
    """3 problems x 4 beams on one system prompt: decode attention reads each tree node once,
    so the tokens it reads are exactly the unique tokens the beams hold."""
    system = prompt(40, seed=1)
    roots = [engine.add(system + prompt(20 + 9 * p, seed=10 + p)) for p in range(3)]  # system blocks: prefix cache
    beams = []
    for root in roots:
        for branch in engine.fork(root, 2):  # a step two beams share, then one each
            engine.append(branch, prompt(20, seed=len(beams)))
            for beam in engine.fork(branch, 2):
                engine.append(beam, prompt(3 + len(beams), seed=200 + len(beams)))
                beams.append(beam)
            engine.free(branch)
        engine.free(root)
    engine.step(beams)
    tree = engine.runner.last_prefix_tree
    assert [len(p) for p in tree.paths] == [3] * 12  # system prompt, question, the shared step
    assert len(tree.nodes) == 1 + 3 + 6
    lengths = [len(b) for b in beams]
    assert tree.tokens_read(lengths, engine.block_size) == engine.stats()["tokens_held"] < sum(lengths)
    for beam in beams:
        torch.testing.assert_close(engine.logits(beam), fresh(beam.token_ids), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- preemption


def test_preempted_sequences_are_restored_with_their_random_streams(engine, tiny_path):
    sampling = SamplingParams(temperature=1.0, seed=7)
    steps = 6
    reference = make_engine(tiny_path)
    root = reference.add(prompt(30))
    kids = reference.fork(root, 2)
    expected = [reference.step(kids, sampling) for _ in range(steps)]

    root = engine.add(prompt(30))
    kids = engine.fork(root, 2)
    got = [engine.step(kids, sampling) for _ in range(3)]
    engine.free(root)
    for kid in kids:
        engine.preempt(kid)
    assert engine.stats()["blocks_used"] == 0 and engine.stats()["sequences"] == 0
    with pytest.raises(ValueError, match="is preempted: restore it first"):
        engine.step(kids, sampling)
    cached = engine.stats()["tokens_forwarded"]
    for kid in kids:
        engine.restore(kid)
    # their full blocks came back from the prefix cache: only each last block was recomputed
    assert engine.stats()["tokens_forwarded"] - cached == 2 * (33 - 32)
    got += [engine.step(kids, sampling) for _ in range(3)]
    assert got == expected
    engine.blocks.check_invariants()


def test_restore_into_a_full_pool_leaves_the_sequence_preempted(tiny_path):
    engine = make_engine(tiny_path, kv_cache_bytes=5 * 16 * 2 * 2 * 2 * 16 * 4)  # 5 blocks of 16 tokens
    seq = engine.add(prompt(40))  # 3 blocks
    engine.preempt(seq)
    filler = engine.add(prompt(70, seed=5))  # 5 blocks: evicts the cached ones
    with pytest.raises(KVCacheFullError, match="restoring a preempted sequence of 40 tokens"):
        engine.restore(seq)
    assert seq.preempted and len(seq) == 40 and engine.stats()["blocks_used"] == 5
    engine.free(filler)
    engine.restore(seq)
    assert not seq.preempted and engine.stats()["blocks_used"] == 3
    engine.free(seq)
    engine.blocks.check_invariants()


# ---------------------------------------------------------------------------- host syncs


def test_a_decode_step_reads_the_device_once(engine):
    """A whole engine step, sampling included, reads one thing back from the device, the
    tokens it sampled (``tokens.tolist()``), and copies nothing to it synchronously: a
    cascade decode (beams sharing a prompt) with sampled and greedy rows, then a plain one.
    Counted on the CPU as CUDA's sync debug mode counts on a GPU (``device_reads.py``)."""
    from device_reads import DeviceReads

    beams = engine.fork(engine.add(prompt(37)), 3)
    sampling = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1), SamplingParams(temperature=1.2, seed=2),
                SamplingParams()]
    for seqs, params in ((beams, sampling), (beams[:1], sampling[:1])):
        with DeviceReads() as counted:
            engine.step(seqs, params)
        assert counted.reads == [("tolist", "read")]
