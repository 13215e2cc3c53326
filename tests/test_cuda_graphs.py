"""CUDA graphs for decode forwards (ttsearch/engine/cuda_graphs.py).

On the CPU: the bucket, padding and tree-fitting logic as plain functions; the whole
static-buffer path run eagerly (``CudaGraphRunner(capture=False)``) against the engine's
own forward; and that an engine on the CPU never uses graphs. On a CUDA device with the
Triton kernels: captured and replayed decode forwards against the same engine without
graphs, for batches that fill a bucket and batches that need padding, over decode steps
with forks and frees, with the replays counted.
"""

from __future__ import annotations

import pytest
import torch

from ttsearch import batch_invariant, ops
from ttsearch.engine.cuda_graphs import (
    BUCKETS,
    CudaGraphRunner,
    StaticLayout,
    bucket_for,
    pad_decode,
    tree_caps,
    use_cuda_graphs,
)
from ttsearch.engine.prefix_tree import PrefixTree, fit_tree, shared_prefix_tree
from ttsearch.models.llama import ForwardBatch

BLOCK = 16
HAS_TRITON_CUDA = torch.cuda.is_available() and ops.IMPLEMENTATIONS.get("cuda") == "triton"
needs_cuda = pytest.mark.skipif(not HAS_TRITON_CUDA, reason="needs a CUDA device with the Triton kernels")


# ----------------------------------------------------------------------------- buckets and padding


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it():
    assert BUCKETS == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    for exact in BUCKETS:
        assert bucket_for(exact) == exact
    assert [bucket_for(n) for n in (3, 5, 9, 17, 25, 33, 49, 65, 97, 129, 193)] == list(BUCKETS[2:])
    assert bucket_for(257) is None and bucket_for(0) is None
    assert bucket_for(3, (4, 12)) == 4 and bucket_for(5, (4, 12)) == 12 and bucket_for(13, (4, 12)) is None


def test_a_tree_of_b_sequences_has_at_most_b_minus_one_nodes():
    assert tree_caps(1) == (0, 8)
    assert tree_caps(2) == (1, 8)
    assert tree_caps(16) == (15, 8)
    assert tree_caps(256) == (64, 8)
    assert tree_caps(256, max_nodes=300, max_levels=3) == (255, 3)
    # the bound itself, on random forests of block tables
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        b = int(torch.randint(2, 24, (1,), generator=gen))
        tables = [[int(x) for x in torch.randint(0, 3, (6,), generator=gen)] for _ in range(b)]
        for t in tables:  # make columns nest: a sequence's block at column c names its whole prefix
            for c in range(1, 6):
                t[c] = t[c - 1] * 3 + t[c] + 1
        tree = shared_prefix_tree(tables, [6] * b)
        assert len(tree.nodes) <= b - 1


def host_batch(tables: list[list[int]], lens: list[int], tree: PrefixTree | None = None) -> ForwardBatch:
    """A decode batch as the model runner builds it on the host."""
    width = max(len(t) for t in tables)
    batch = ForwardBatch(
        positions=torch.tensor([n - 1 for n in lens]),
        slot_mapping=torch.tensor([t[(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)]),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=None,
        last_rows=torch.arange(len(lens)),
    )
    if tree is not None and tree.nodes:
        w = max(len(n) for n in tree.nodes)
        depth = max(len(p) for p in tree.paths)
        batch.prefix_tables = torch.tensor([n + [0] * (w - len(n)) for n in tree.nodes], dtype=torch.int32)
        batch.prefix_lens = torch.tensor([len(n) * BLOCK for n in tree.nodes], dtype=torch.int32)
        batch.seq_group = torch.tensor([p + [-1] * (depth - len(p)) for p in tree.paths], dtype=torch.int32)
    return batch


def padded_views(padded, layout: StaticLayout, bucket: int, max_blocks: int, cascade: bool):
    """The padded batch as the captured forward of ``bucket`` sees it (static buffers of
    ``max_blocks`` columns, stale columns past the copied ones holding block 0)."""
    mb, nodes = layout.max_bucket, tree_caps(bucket, layout.max_nodes, layout.max_levels)[0]
    tables = torch.zeros(bucket, max_blocks, dtype=torch.int32)
    tables[:, : padded.tables.shape[1]] = padded.tables
    views = dict(ids=padded.long[0, :bucket], positions=padded.long[1, :bucket], slots=padded.long[2, :bucket],
                 tables=tables, lens=padded.meta[:bucket])
    if cascade:
        prefix = torch.zeros(nodes, max_blocks, dtype=torch.int32)
        prefix[: padded.prefix_tables.shape[0], : padded.prefix_tables.shape[1]] = padded.prefix_tables
        views |= dict(prefix_tables=prefix, prefix_lens=padded.meta[mb : mb + nodes],
                      seq_group=padded.meta[mb + layout.max_nodes :].view(mb, layout.max_levels)[:bucket])
    return views


BEAM_TABLES = [  # 5 beams: a 3-block prompt, two questions, then steps shared by pairs
    [0, 1, 2, 3, 4, 9],
    [0, 1, 2, 3, 4, 10],
    [0, 1, 2, 3, 5, 11],
    [0, 1, 2, 6, 7, 12],
    [0, 1, 2, 6, 8, 13],
]
BEAM_LENS = [5 * BLOCK + 3] * 5  # every table's last block is partial


def test_padding_rows_are_dummies_that_read_a_valid_block_and_write_nothing():
    tree = shared_prefix_tree(BEAM_TABLES, [(n - 1) // BLOCK for n in BEAM_LENS])
    assert len(tree.nodes) == 4 and max(len(p) for p in tree.paths) == 3
    layout = StaticLayout(max_bucket=16, max_blocks=40, max_nodes=tree_caps(16)[0], max_levels=8, block_size=BLOCK)
    batch = host_batch(BEAM_TABLES, BEAM_LENS, tree)
    ids = torch.tensor([11, 12, 13, 14, 15])
    padded = pad_decode(ids, batch, 8, layout)
    views = padded_views(padded, layout, 8, layout.max_blocks, cascade=True)
    assert views["ids"].tolist() == [11, 12, 13, 14, 15, 0, 0, 0]
    assert views["positions"].tolist() == [n - 1 for n in BEAM_LENS] + [0] * 3
    assert views["slots"].tolist()[:5] == batch.slot_mapping.tolist() and views["slots"].tolist()[5:] == [-1] * 3
    assert views["lens"].tolist() == BEAM_LENS + [1] * 3
    assert views["tables"][5:].eq(0).all() and torch.equal(views["tables"][:5, :6], batch.block_tables)
    assert views["seq_group"][5:].eq(-1).all() and views["seq_group"][:5, 3:].eq(-1).all()
    assert torch.equal(views["seq_group"][:5, :3], batch.seq_group)
    assert views["prefix_lens"].tolist() == batch.prefix_lens.tolist() + [BLOCK] * 3  # padding nodes: one block
    # the ops' own checks accept the padded batch: padding nodes hold no member, dummies one token of block 0
    ops.check_metadata(14, BLOCK, views["tables"], views["lens"], views["slots"], None, views["prefix_tables"],
                       views["prefix_lens"], views["seq_group"])
    assert views["prefix_tables"].shape == (7, layout.max_blocks)
    # the same batch without a tree, in the bucket it fills exactly... of 5: bucket 8 again, no tree
    plain = pad_decode(ids, host_batch(BEAM_TABLES, BEAM_LENS), 8, layout)
    assert plain.prefix_tables is None and padded_views(plain, layout, 8, 40, False)["lens"].tolist()[5:] == [1] * 3


def test_pad_decode_refuses_what_does_not_fit_its_bucket():
    layout = StaticLayout(max_bucket=8, max_blocks=6, max_nodes=tree_caps(8)[0], max_levels=1, block_size=BLOCK)
    tree = shared_prefix_tree(BEAM_TABLES, [(n - 1) // BLOCK for n in BEAM_LENS])
    batch = host_batch(BEAM_TABLES, BEAM_LENS, tree)
    ids = torch.arange(5)
    with pytest.raises(ValueError, match="does not fit a bucket of 4"):
        pad_decode(ids, batch, 4, layout)
    with pytest.raises(ValueError, match="fit_tree it first"):  # 3 levels, the layout takes 1
        pad_decode(ids, batch, 8, layout)
    wide = host_batch([t + [20, 21] for t in BEAM_TABLES], [n + 2 * BLOCK for n in BEAM_LENS])
    with pytest.raises(ValueError, match="over the static 6"):
        pad_decode(ids, wide, 8, layout)


# ----------------------------------------------------------------------------- fitting the tree


def node_key(tree: PrefixTree, g: int) -> tuple[int, ...]:
    return tuple(tree.nodes[g])


def test_fit_tree_keeps_a_tree_that_fits_as_it_is():
    tree = shared_prefix_tree(BEAM_TABLES, [5] * 5)
    assert fit_tree(tree, 4, 3) is tree and fit_tree(tree, 4, 2) is not tree
    assert fit_tree(PrefixTree([], [[]] * 3), 0, 0).nodes == []


@pytest.mark.parametrize("max_nodes,max_levels", [(0, 8), (1, 8), (2, 8), (3, 8), (8, 1), (3, 1), (2, 2)])
def test_fit_tree_cuts_to_the_caps_keeping_ancestors_and_the_biggest_savings(max_nodes, max_levels):
    tables = [  # a prompt under all 8; questions under 4 each; 2-block steps under pairs; a 1-block step under 2
        [0, 1, 2, 3, 4, 10, 11, 30], [0, 1, 2, 3, 4, 10, 11, 31], [0, 1, 2, 3, 4, 12, 32, 33],
        [0, 1, 2, 3, 4, 13, 34, 35], [0, 1, 5, 6, 7, 14, 15, 36], [0, 1, 5, 6, 7, 14, 15, 37],
        [0, 1, 5, 6, 8, 16, 38, 39], [0, 1, 5, 6, 8, 17, 40, 41],
    ]
    lens = [8 * BLOCK] * 8
    tree = shared_prefix_tree(tables, [(n - 1) // BLOCK for n in lens])
    fitted = fit_tree(tree, max_nodes, max_levels)
    assert len(fitted.nodes) <= max_nodes and all(len(p) <= max_levels for p in fitted.paths)
    # every path keeps a prefix of its own path, node for node
    for old, new in zip(tree.paths, fitted.paths):
        assert [node_key(fitted, g) for g in new] == [node_key(tree, g) for g in old[: len(new)]]
    # a node keeps all its members: every path through it still holds it
    for g in range(len(fitted.nodes)):
        holders = [b for b, p in enumerate(tree.paths) if any(node_key(tree, h) == node_key(fitted, g) for h in p)]
        assert holders == [b for b, p in enumerate(fitted.paths) if g in p]
    # the kept nodes are the greedy choice: the root first, then the largest saving below a kept node
    savings = {node_key(tree, g): (sum(g in p for p in tree.paths) - 1) * len(tree.nodes[g])
               for g in range(len(tree.nodes))}
    kept = {node_key(fitted, g) for g in range(len(fitted.nodes))}
    if max_nodes >= 1 and max_levels >= 1:
        assert (0, 1) in kept  # the prompt, under all 8
    if max_nodes >= 3 and max_levels >= 2:
        assert {(2, 3, 4), (5, 6)} <= kept  # 3 blocks x 3 others, 2 blocks x 3 others, before any step
    assert len(kept) == min(max_nodes, sum(1 for g in range(len(tree.nodes))
                                           if tree_level(tree, g) < max_levels))
    # the ops take the fitted tree
    batch = host_batch(tables, lens, fitted)
    ops.check_metadata(64, BLOCK, batch.block_tables, batch.context_lens, batch.slot_mapping, None,
                       batch.prefix_tables, batch.prefix_lens, batch.seq_group)
    # no node left out saves more than the least kept one, unless its parent was left out or is too deep
    for g in range(len(tree.nodes)):
        key, level = node_key(tree, g), tree_level(tree, g)
        parent = next(p[level - 1] for p in tree.paths if g in p) if level else None
        if key not in kept and level < max_levels and (parent is None or node_key(tree, parent) in kept) and kept:
            assert savings[key] <= min(savings[k] for k in kept)


def tree_level(tree: PrefixTree, g: int) -> int:
    return next(p.index(g) for p in tree.paths if g in p)


# ----------------------------------------------------------------------------- the engine's option


def test_an_engine_on_the_cpu_never_uses_graphs(tiny_checkpoints):
    from ttsearch.engine.engine import Engine

    engine = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False)
    assert engine.cuda_graphs is False and engine.runner.graphs is None
    root = engine.add(list(range(3, 40)))
    engine.step(engine.fork(root, 3))  # decode runs eagerly
    engine = Engine(str(tiny_checkpoints["llama3"]), dtype="float32", kv_cache_bytes=1 << 20, progress=False,
                    cuda_graphs=False)
    assert engine.runner.graphs is None
    with pytest.raises(ValueError, match="cuda_graphs=True: CUDA graphs need a CUDA device, and the engine is on cpu"):
        Engine(str(tiny_checkpoints["llama3"]), progress=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        Engine(str(tiny_checkpoints["llama3"]), progress=False, cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs a CUDA KV cache"):
        CudaGraphRunner(engine.model, engine.kv_cache, 8)


def test_graphs_are_on_for_cuda_only_with_the_triton_kernels(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cuda", "triton")
    assert use_cuda_graphs(None, cuda) and use_cuda_graphs(True, cuda) and not use_cuda_graphs(False, cuda)
    assert not use_cuda_graphs(None, cpu) and not use_cuda_graphs(False, cpu)
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "cuda", "reference")
    assert not use_cuda_graphs(None, cuda)
    with pytest.raises(ValueError, match="need the Triton kernels"):
        use_cuda_graphs(True, cuda)
    with pytest.raises(ValueError, match="must be True, False or None"):
        use_cuda_graphs(1, cuda)


# ----------------------------------------------------------------------------- the static-buffer path


def decode_scenario(engine) -> list[torch.Tensor]:
    """Decode forwards over forks and frees, of batch sizes that fill a bucket (1, 4, 8, 16)
    and that need padding (3, 5, 7, 21, 33), with shared prefixes on several levels (the
    beams fork again after some steps). Every forward writes fixed tokens (so two engines
    take the same steps whatever their logits); returns each forward's logits."""
    logits = []
    step = 0

    def decode(seqs):
        nonlocal step
        engine.append_batch(seqs, [[3 + (17 * step + 5 * i) % 250] for i in range(len(seqs))])
        logits.append(torch.stack([engine.logits(s) for s in seqs]).float().cpu())
        step += 1

    root = engine.add(list(range(3, 3 + 2 * BLOCK + 7)))
    other = engine.add([5] * BLOCK + list(range(60, 60 + BLOCK + 2)))
    decode([root])
    beams = engine.fork(root, 4)
    decode(beams)
    decode(beams + [other])
    engine.free(beams.pop(0))
    decode(beams)
    for _ in range(BLOCK):  # past a block boundary: the beams' own steps become whole blocks
        decode(beams + [other])
    kids = engine.fork(beams[1], 4)  # a second level: a step shared by beams[1]'s children
    decode(beams + kids)  # 7
    crowd = engine.fork(other, 13)
    decode(beams + kids + crowd + [other])  # 21
    decode((crowd + kids)[:16])
    decode((crowd + kids)[:8])
    for seq in kids[:2]:
        engine.free(seq)
    more = engine.fork(crowd[0], 15)
    decode(beams + kids[2:] + crowd + more)  # 33
    for seq in [root, other, *beams, *kids[2:], *crowd, *more]:
        engine.free(seq)
    return logits


def dry_run_engines(checkpoint, dtype="float32", **runner_options):
    """Two CPU engines on one checkpoint; the second runs its decode forwards through the
    static buffers of a CudaGraphRunner that does not capture."""
    from ttsearch.engine.engine import Engine

    engines = [Engine(str(checkpoint), dtype=dtype, kv_cache_bytes=8 << 20, progress=False) for _ in range(2)]
    graphed = engines[1]
    max_blocks = -(-graphed.max_model_len // graphed.block_size)
    graphed.runner.graphs = CudaGraphRunner(graphed.model, graphed.kv_cache, max_blocks, capture=False,
                                            **runner_options)
    return engines


def test_the_static_path_gives_the_eager_logits_on_the_cpu(tiny_checkpoints):
    eager, graphed = dry_run_engines(tiny_checkpoints["llama3"])
    expected, got = decode_scenario(eager), decode_scenario(graphed)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    runner = graphed.runner.graphs
    assert runner.replays == len(got) and runner.captures == 0  # nothing captured on the CPU
    keys = set(runner._graphs)
    assert (1, False, False) in keys and (8, True, False) in keys and (48, True, False) in keys


def test_the_static_path_is_bitwise_the_eager_one_in_batch_invariant_mode(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(batch_invariant, "_enabled", True)
    eager, graphed = dry_run_engines(tiny_checkpoints["qwen2"], dtype="bfloat16")
    for a, b in zip(decode_scenario(eager), decode_scenario(graphed), strict=True):
        assert torch.equal(a, b)
    assert all(not cascade and invariant for _, cascade, invariant in graphed.runner.graphs._graphs)


def test_a_tree_over_the_caps_is_cut_and_still_exact(tiny_checkpoints):
    eager, graphed = dry_run_engines(tiny_checkpoints["mistral"], max_nodes=1, max_levels=1)
    trees = []
    forward = graphed.runner.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        trees.append(graphed.runner.last_prefix_tree)
        return out

    graphed.runner.forward = recording
    for a, b in zip(decode_scenario(eager), decode_scenario(graphed), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert any(t is not None and t.nodes for t in trees)
    assert all(t is None or (len(t.nodes) <= 1 and all(len(p) <= 1 for p in t.paths)) for t in trees)


def test_a_failed_capture_falls_back_to_eager_unless_strict(tiny_checkpoints, monkeypatch):
    eager, graphed = dry_run_engines(tiny_checkpoints["llama3"], strict=False)
    runner = graphed.runner.graphs

    def broken(key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "_capture", broken)
    with pytest.warns(UserWarning, match="CUDA graphs are off for this engine: capturing a decode batch of bucket 1"):
        got = decode_scenario(graphed)
    for a, b in zip(decode_scenario(eager), got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert runner.failed and runner.replays == 0 and not runner.fits(1)

    _, strict = dry_run_engines(tiny_checkpoints["llama3"])
    monkeypatch.setattr(strict.runner.graphs, "_capture", broken)
    root = strict.add(list(range(3, 20)))
    with pytest.raises(RuntimeError, match="stream is capturing"):
        strict.step([root])


# ----------------------------------------------------------------------------- on CUDA


def cuda_engines(checkpoint, dtype, **runner_options):
    """Two CUDA engines on one checkpoint, with and without graphs."""
    from ttsearch.engine.engine import Engine

    def make(graphs):
        return Engine(str(checkpoint), dtype=dtype, device="cuda", kv_cache_bytes=32 << 20, progress=False,
                      cuda_graphs=graphs)

    eager, graphed = make(False), make(True)
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    if runner_options:
        max_blocks = -(-graphed.max_model_len // graphed.block_size)
        graphed.runner.graphs = CudaGraphRunner(graphed.model, graphed.kv_cache, max_blocks, **runner_options)
    return eager, graphed


def assert_logits_match(got: torch.Tensor, expected: torch.Tensor, dtype: str) -> None:
    if dtype == "float32":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # split-KV counts and GEMM kernels differ between the bucket and the live batch: bf16 rounding
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_a_cuda_engine_captures_by_default(tiny_checkpoints):
    from ttsearch.engine.engine import Engine

    engine = Engine(str(tiny_checkpoints["llama3"]), device="cuda", kv_cache_bytes=8 << 20, progress=False)
    assert engine.cuda_graphs and isinstance(engine.runner.graphs, CudaGraphRunner)
    assert engine.runner.graphs.layout.max_blocks == -(-engine.max_model_len // engine.block_size)


@needs_cuda
@pytest.mark.parametrize("batch", [1, 8, 16, 3, 5, 20, 100])  # a bucket exactly, then padded
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphed_decode_logits_equal_eager(tiny_checkpoints, dtype, batch):
    eager, graphed = cuda_engines(tiny_checkpoints["llama3"], dtype)
    results = []
    for engine in (eager, graphed):
        root = engine.add(list(range(3, 3 + 2 * BLOCK + 5)))
        seqs = engine.fork(root, batch) if batch > 1 else [root]
        rows = []
        for step in range(3):  # the first captures, the others replay
            engine.append_batch(seqs, [[7 + (step * 11 + i) % 200] for i in range(batch)])
            rows.append(torch.stack([engine.logits(s) for s in seqs]).cpu())
        results.append(rows)
    for expected, got in zip(*results, strict=True):
        assert_logits_match(got, expected, dtype)
    runner = graphed.runner.graphs
    assert runner.replays == 3 and runner.captures == 1
    assert next(iter(runner._graphs))[0] == bucket_for(batch)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graphed_decode_over_forks_and_frees_equals_eager(tiny_checkpoints, dtype):
    eager, graphed = cuda_engines(tiny_checkpoints["qwen2"], dtype)
    expected, got = decode_scenario(eager), decode_scenario(graphed)
    for a, b in zip(expected, got, strict=True):
        assert_logits_match(b, a, dtype)
    runner = graphed.runner.graphs
    assert runner.replays == len(got)
    assert runner.captures == len(runner._graphs) < len(got)  # each bucket captured once, then replayed


@needs_cuda
def test_graphed_decode_is_bitwise_eager_in_batch_invariant_mode(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(batch_invariant, "_enabled", True)
    eager, graphed = cuda_engines(tiny_checkpoints["llama3"], "bfloat16")
    for a, b in zip(decode_scenario(eager), decode_scenario(graphed), strict=True):
        assert torch.equal(a, b)


@needs_cuda
def test_a_cut_tree_on_cuda_equals_eager(tiny_checkpoints):
    eager, graphed = cuda_engines(tiny_checkpoints["mistral"], "float32", max_nodes=2, max_levels=1)
    for a, b in zip(decode_scenario(eager), decode_scenario(graphed), strict=True):
        assert_logits_match(b, a, "float32")


@needs_cuda
def test_replays_are_counted_and_only_decode_fitting_a_bucket_replays(tiny_checkpoints):
    eager, graphed = cuda_engines(tiny_checkpoints["llama3"], "float32")
    runner = graphed.runner.graphs
    results = []

    def decode(engine, seqs):
        engine.append_batch(seqs, [[5 + i % 200] for i in range(len(seqs))])

    for engine in (eager, graphed):
        root = engine.add(list(range(3, 3 + BLOCK + 3)))  # extend: no replay
        engine.append(root, [9, 10, 11])  # extend: no replay
        crowd = engine.fork(root, 300)
        decode(engine, crowd)  # over the largest bucket: eager
        if engine is graphed:
            assert runner.replays == 0
        decode(engine, crowd[:200])  # bucket 256
        decode(engine, crowd[:200])
        decode(engine, [root])  # bucket 1
        results.append(torch.stack([engine.logits(s) for s in crowd + [root]]).cpu())
    assert runner.replays == 3 and runner.captures == 2
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@needs_cuda
def test_a_replayed_decode_never_waits_for_the_device(tiny_checkpoints):
    """After the capture (which synchronizes once per bucket), a graphed decode forward makes
    no device-to-host copy and no synchronization: CUDA's sync debug mode set to error."""
    _, engine = cuda_engines(tiny_checkpoints["llama3"], "bfloat16")
    root = engine.add(list(range(3, 3 + 2 * BLOCK + 3)))
    beams = engine.fork(root, 3)
    runner = engine.runner
    runner.forward(beams, [[5], [6], [7]], logits=False)  # captures bucket 4 with a tree
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.forward(beams, [[8], [9], [10]], logits=False)
        runner.forward(beams, [[11], [12], [13]], logits=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert runner.graphs.replays == 3 and runner.graphs.captures == 1
