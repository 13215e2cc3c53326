"""The ops on SmolLM2-135M shapes: pure-torch reference vs the C++ kernels.

    pytest benchmarks/bench_ops.py --benchmark-json benchmarks/results/ops_cpu.json

Each benchmark records in ``extra_info`` the bytes the op must read and write and those
bytes divided by the mean time (GB/s). ``reference`` is ``ttsearch.ops.reference``; for
decode attention that is the plain-torch way: gather the blocks into a dense tensor, then
``F.scaled_dot_product_attention``. ``cpp`` calls the registered op, which the C++
extension serves on the CPU (skipped when it is not built). Neither goes through the
public wrappers' argument validation.

The shared-prefix sweep (``test_shared_prefix_decode``): N beams share a P-token
prefix and hold 64 tokens of their own, decoded three ways — ``plain_torch`` (the reference
decode: gather + SDPA), ``paged_cpp`` (plain paged decode attention in C++, every beam
reads the prefix) and ``cascade_cpp`` (cascade decode attention in C++, the prefix read once
per group). ``extra_info`` gives the bytes each way reads and their rate, and the
unique-token bytes ``U * 2 * kv_heads * head_dim * elem`` (U = P + 64 N), the floor every
way could reach, with their rate.

The multi-level case (``test_multilevel_prefix_decode``): 8 problems x 32 beams behind a
256-token system prompt, a 256-token question per problem and 64 own tokens per beam,
decoded as ``paged_cpp`` (every beam reads its whole context), ``cascade_1level_cpp``
(one group: the system prompt read once, each beam reads its question) and
``cascade_tree_cpp`` (two levels: the system prompt read once, each question once per
problem). ``extra_info`` gives each way's KV bytes read next to the unique-token bytes.
"""

from __future__ import annotations

import math

import pytest
import torch

import ttsearch.ops as ops
from ttsearch.ops import reference

# SmolLM2-135M: 9 query heads, 3 kv heads, head_dim 64, 30 layers; the engine's block size.
HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LABELS = {
    "reference": "reference (plain torch)",
    "reference-decode": "plain torch: gather blocks to dense + F.scaled_dot_product_attention",
    "cpp": "ttsearch._C",
}
IMPLS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not ops.IMPLEMENTATIONS["cpu"].startswith("cpp"), reason="ttsearch._C is not built")),
]


def implementation(impl, name):
    return getattr(reference, name) if impl == "reference" else getattr(torch.ops.ttsearch, name)


def record(benchmark, impl, label, nbytes):
    benchmark.extra_info["implementation"] = impl
    benchmark.extra_info["label"] = label
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = nbytes / benchmark.stats.stats.mean / 1e9


def paged_pool(ctx_lens, dtype, seed=0):
    """K/V pools holding the contexts in shuffled blocks, as a pool looks after some churn."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / BLOCK) for c in ctx_lens]
    num_blocks = sum(needed)
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(needed), dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = ids[used : used + n]
        used += n
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    return k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx", [256, 1024])
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_attention(benchmark, impl, dtype, ctx, batch):
    k_cache, v_cache, tables, lens = paged_pool([ctx] * batch, DTYPES[dtype])
    query = torch.randn(batch, HEADS, HEAD_DIM).to(DTYPES[dtype])
    op = implementation(impl, "paged_decode_attention")
    benchmark.group = f"decode {dtype} batch {batch} ctx {ctx}"

    benchmark(op, query, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)

    elem = query.element_size()
    kv_bytes = 2 * batch * ctx * KV_HEADS * HEAD_DIM * elem
    nbytes = kv_bytes + 2 * query.numel() * elem + tables.numel() * 4 + lens.numel() * 4
    record(benchmark, impl, LABELS["reference-decode" if impl == "reference" else impl], nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_attention(benchmark, impl, dtype):
    """A 512-token prompt prefilled at once."""
    tokens = 512
    k_cache, v_cache, tables, lens = paged_pool([tokens], DTYPES[dtype])
    query = torch.randn(tokens, HEADS, HEAD_DIM).to(DTYPES[dtype])
    starts = torch.tensor([0, tokens], dtype=torch.int32)
    op = implementation(impl, "paged_extend_attention")
    benchmark.group = f"extend {dtype} prefill {tokens}"

    benchmark(op, query, k_cache, v_cache, tables, starts, lens, HEAD_DIM**-0.5)

    elem = query.element_size()
    nbytes = 2 * tokens * KV_HEADS * HEAD_DIM * elem + 2 * query.numel() * elem + tables.numel() * 4
    record(benchmark, impl, LABELS[impl], nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(benchmark, impl, dtype):
    """One decode step of 64 sequences: a token each into a 1024-token-per-sequence pool."""
    batch, num_blocks = 64, 64 * 1024 // BLOCK
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=DTYPES[dtype])
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPES[dtype])
    value = torch.randn(batch, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPES[dtype])
    slots = torch.randperm(num_blocks * BLOCK, generator=gen)[:batch]
    op = implementation(impl, "store_kv")
    benchmark.group = f"store_kv {dtype} batch {batch}"

    benchmark(op, key, value, k_cache, v_cache, slots)

    nbytes = 4 * key.numel() * key.element_size() + slots.numel() * 8
    record(benchmark, impl, LABELS[impl], nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(benchmark, impl, dtype):
    """Copy-on-write of 64 forked tails in all 30 layers, K and V."""
    pairs, num_blocks = 64, 256
    kv_cache = torch.randn(2, LAYERS, num_blocks, BLOCK, KV_HEADS, HEAD_DIM).to(DTYPES[dtype])
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0))
    src, dst = ids[:pairs], ids[pairs : 2 * pairs]
    op = implementation(impl, "copy_blocks")
    benchmark.group = f"copy_blocks {dtype} {pairs} blocks x {LAYERS} layers"

    benchmark(op, kv_cache, src, dst)

    block_bytes = BLOCK * KV_HEADS * HEAD_DIM * kv_cache.element_size()
    nbytes = 2 * (2 * LAYERS * pairs * block_bytes) + 2 * pairs * 8
    record(benchmark, impl, LABELS[impl], nbytes)


# ----------------------------------------------------------------------------- shared prefix sweep

SWEEP_IMPLS = [
    "plain_torch",
    pytest.param("paged_cpp", marks=pytest.mark.skipif(not ops.IMPLEMENTATIONS["cpu"].startswith("cpp"), reason="ttsearch._C is not built")),
    pytest.param("cascade_cpp", marks=pytest.mark.skipif(not ops.IMPLEMENTATIONS["cpu"].startswith("cpp"), reason="ttsearch._C is not built")),
]
SWEEP_LABELS = {
    "plain_torch": "plain torch: gather blocks to dense + F.scaled_dot_product_attention (the reference decode)",
    "paged_cpp": "ttsearch._C paged_decode_attention: each beam reads its whole context",
    "cascade_cpp": "ttsearch._C cascade_decode_attention: the shared prefix read once per group",
}
PRIVATE_TOKENS = 64


def shared_prefix_pool(beams, prefix, dtype, seed=0):
    """Beams whose tables start with the same ``prefix // BLOCK`` blocks, then 64 private
    tokens each, in a shuffled pool; and the group description the cascade op takes."""
    gen = torch.Generator().manual_seed(seed)
    prefix_blocks, own_blocks = prefix // BLOCK, math.ceil(PRIVATE_TOKENS / BLOCK)
    num_blocks = prefix_blocks + beams * own_blocks
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.empty(beams, prefix_blocks + own_blocks, dtype=torch.int32)
    tables[:, :prefix_blocks] = ids[:prefix_blocks]
    tables[:, prefix_blocks:] = ids[prefix_blocks:].view(beams, own_blocks)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    lens = torch.full((beams,), prefix + PRIVATE_TOKENS, dtype=torch.int32)
    groups = (ids[None, :prefix_blocks].clone(), torch.tensor([prefix], dtype=torch.int32),
              torch.zeros(beams, dtype=torch.int32))
    return k_cache, v_cache, tables, lens, groups


@pytest.mark.parametrize("impl", SWEEP_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", [256, 1024])
@pytest.mark.parametrize("beams", [16, 64, 256])
def test_shared_prefix_decode(benchmark, impl, dtype, prefix, beams):
    k_cache, v_cache, tables, lens, groups = shared_prefix_pool(beams, prefix, DTYPES[dtype])
    query = torch.randn(beams, HEADS, HEAD_DIM).to(DTYPES[dtype])
    scale = HEAD_DIM**-0.5
    benchmark.group = f"shared prefix {dtype} N={beams} P={prefix} +{PRIVATE_TOKENS}"
    if impl == "plain_torch":
        benchmark(reference.paged_decode_attention, query, k_cache, v_cache, tables, lens, scale)
    elif impl == "paged_cpp":
        benchmark(torch.ops.ttsearch.paged_decode_attention, query, k_cache, v_cache, tables, lens, scale)
    else:
        benchmark(torch.ops.ttsearch.cascade_decode_attention, query, k_cache, v_cache, tables, lens, *groups, scale)

    elem = query.element_size()
    token_bytes = 2 * KV_HEADS * HEAD_DIM * elem  # K and V of one token in one layer
    unique_tokens = prefix + beams * PRIVATE_TOKENS
    read_tokens = unique_tokens if impl == "cascade_cpp" else beams * (prefix + PRIVATE_TOKENS)
    io_bytes = 2 * query.numel() * elem + tables.numel() * 4 + lens.numel() * 4
    record(benchmark, impl, SWEEP_LABELS[impl], read_tokens * token_bytes + io_bytes)
    info = benchmark.extra_info
    info.update(beams=beams, prefix_tokens=prefix, private_tokens=PRIVATE_TOKENS, unique_tokens=unique_tokens,
                unique_token_bytes=unique_tokens * token_bytes,
                attention_flops=4 * beams * HEADS * (prefix + PRIVATE_TOKENS) * HEAD_DIM)
    if benchmark.stats:
        mean = benchmark.stats.stats.mean
        info["unique GB/s"] = unique_tokens * token_bytes / mean / 1e9
        info["GFLOP/s"] = info["attention_flops"] / mean / 1e9


MULTILEVEL_IMPLS = [
    pytest.param(impl, marks=pytest.mark.skipif(not ops.IMPLEMENTATIONS["cpu"].startswith("cpp"), reason="ttsearch._C is not built"))
    for impl in ("paged_cpp", "cascade_1level_cpp", "cascade_tree_cpp")
]
MULTILEVEL_LABELS = {
    "paged_cpp": "ttsearch._C paged_decode_attention: each beam reads its whole context",
    "cascade_1level_cpp": "ttsearch._C cascade_decode_attention, one level: the system prompt read once",
    "cascade_tree_cpp": "ttsearch._C cascade_decode_attention, two levels: the system prompt once, each question once",
}


def problem_tree_pool(problems, beams, system, question, dtype, seed=0):
    """``problems`` x ``beams`` beams: a ``system``-token prompt all share, a
    ``question``-token question per problem shared by its beams, then 64 private tokens
    each, in a shuffled pool. Returns the caches, tables and lengths, and the prefix
    description for each way: one level (the system prompt) and the tree (system prompt,
    then the beam's question)."""
    gen = torch.Generator().manual_seed(seed)
    system_blocks, question_blocks = system // BLOCK, question // BLOCK
    own_blocks, batch = math.ceil(PRIVATE_TOKENS / BLOCK), problems * beams
    num_blocks = system_blocks + problems * question_blocks + batch * own_blocks
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    system_ids = ids[:system_blocks]
    question_ids = ids[system_blocks : system_blocks + problems * question_blocks].view(problems, question_blocks)
    problem = torch.arange(batch) // beams
    tables = torch.cat([system_ids.expand(batch, -1), question_ids[problem],
                        ids[system_blocks + problems * question_blocks :].view(batch, own_blocks)], dim=1)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    lens = torch.full((batch,), system + question + PRIVATE_TOKENS, dtype=torch.int32)
    one_level = (system_ids[None, :].clone(), torch.tensor([system], dtype=torch.int32),
                 torch.zeros(batch, dtype=torch.int32))
    node_tables = torch.zeros(1 + problems, max(system_blocks, question_blocks), dtype=torch.int32)
    node_tables[0, :system_blocks] = system_ids
    node_tables[1:, :question_blocks] = question_ids
    node_lens = torch.tensor([system] + [question] * problems, dtype=torch.int32)
    paths = torch.stack([torch.zeros(batch, dtype=torch.int32), 1 + problem.to(torch.int32)], dim=1)  # [B, 2]
    return k_cache, v_cache, tables, lens, one_level, (node_tables, node_lens, paths)


@pytest.mark.parametrize("impl", MULTILEVEL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multilevel_prefix_decode(benchmark, impl, dtype):
    problems, beams, system, question = 8, 32, 256, 256
    k_cache, v_cache, tables, lens, one_level, tree = problem_tree_pool(problems, beams, system, question,
                                                                        DTYPES[dtype])
    batch = problems * beams
    query = torch.randn(batch, HEADS, HEAD_DIM).to(DTYPES[dtype])
    scale = HEAD_DIM**-0.5
    benchmark.group = (f"multi-level prefix {dtype} {problems} problems x {beams} beams S={system} Q={question} "
                       f"+{PRIVATE_TOKENS}")
    if impl == "paged_cpp":
        benchmark(torch.ops.ttsearch.paged_decode_attention, query, k_cache, v_cache, tables, lens, scale)
    else:
        nodes = one_level if impl == "cascade_1level_cpp" else tree
        benchmark(torch.ops.ttsearch.cascade_decode_attention, query, k_cache, v_cache, tables, lens, *nodes, scale)

    elem = query.element_size()
    token_bytes = 2 * KV_HEADS * HEAD_DIM * elem  # K and V of one token in one layer
    unique_tokens = system + problems * question + batch * PRIVATE_TOKENS
    read_tokens = {
        "paged_cpp": batch * (system + question + PRIVATE_TOKENS),
        "cascade_1level_cpp": system + batch * (question + PRIVATE_TOKENS),
        "cascade_tree_cpp": unique_tokens,
    }[impl]
    io_bytes = 2 * query.numel() * elem + tables.numel() * 4 + lens.numel() * 4
    record(benchmark, impl, MULTILEVEL_LABELS[impl], read_tokens * token_bytes + io_bytes)
    info = benchmark.extra_info
    info.update(problems=problems, beams_per_problem=beams, system_tokens=system, question_tokens=question,
                private_tokens=PRIVATE_TOKENS, kv_tokens_read=read_tokens, kv_bytes_read=read_tokens * token_bytes,
                unique_tokens=unique_tokens, unique_token_bytes=unique_tokens * token_bytes)
    if benchmark.stats:
        info["unique GB/s"] = unique_tokens * token_bytes / benchmark.stats.stats.mean / 1e9


# ----------------------------------------------------------------------------- prm_step_score


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tags,hidden", [(256, 576), (256, 4096)])
def test_prm_step_score(benchmark, impl, dtype, tags, hidden):
    """One scoring step of 256 beams: the final norm, 2 LM-head rows and the mean aggregate
    (hidden 576: SmolLM2-135M; 4096: an 8B PRM)."""
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(tags, hidden, generator=gen).to(DTYPES[dtype])
    norm_weight = torch.rand(hidden, generator=gen).to(DTYPES[dtype])
    head_weight = (torch.randn(2, hidden, generator=gen) * hidden**-0.5).to(DTYPES[dtype])
    prev_agg, prev_count = torch.rand(tags, generator=gen), torch.arange(tags) % 5
    op = implementation(impl, "prm_step_score")
    benchmark.group = f"prm_step_score {dtype} {tags} tags x hidden {hidden}"

    benchmark(op, states, norm_weight, 1e-5, head_weight, None, 1, prev_agg, prev_count, "mean")

    elem = states.element_size()
    nbytes = (states.numel() + 3 * hidden) * elem + tags * (4 + 8) + 2 * tags * 4
    record(benchmark, impl, LABELS[impl], nbytes)
