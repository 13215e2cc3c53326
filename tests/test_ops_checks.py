"""What the public ops check before dispatch, and where: errors that name the bad entry and
leave the caches as they were; ``check_indices=False`` reading no tensor data; the host-side
``check_metadata`` that a forward runs once (and a CUDA forward that never waits for the
device); every op's schema and fake kernel against its implementations (``opcheck``).
"""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import BLOCK, cascade_args, make_cascade, make_paged, prm_inputs
from ttsearch.ops import checks



# ----------------------------------------------------------------------------- opcheck


def opcheck_cases():
    k_cache, v_cache, tables, _, lens = make_paged([5, 17], 2, 32, torch.float32)
    query = torch.randn(2, 4, 32)
    yield "paged_decode_attention", (query, k_cache, v_cache, tables, lens, 0.2)
    starts = torch.tensor([0, 5, 9], dtype=torch.int32)
    yield "paged_extend_attention", (torch.randn(9, 4, 32), k_cache, v_cache, tables, starts, lens, 0.2)
    key, value = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    yield "store_kv", (key, value, k_cache.clone(), v_cache.clone(), torch.tensor([3, -1, 40]))
    yield "copy_blocks", (torch.randn(2, 2, 6, BLOCK, 2, 32), torch.tensor([0, 1]), torch.tensor([4, 5]))
    args, _, ctx_lens = make_cascade([(2, [1, 17, 0]), (1, [3])], [20], 2, 32, torch.float32)
    yield "cascade_decode_attention", cascade_args(args, torch.randn(len(ctx_lens), 4, 32), 0.2)
    args, _, ctx_lens = make_cascade([(1, [(1, [0, 3]), (2, [5])])], [20], 2, 32, torch.float32)
    yield "cascade_decode_attention", cascade_args(args, torch.randn(len(ctx_lens), 4, 32), 0.2)
    hidden, norm_weight, head_weight, head_bias, prev_agg, prev_count = prm_inputs(3, 48, 2, torch.float32)
    yield "prm_step_score", (hidden, norm_weight, 1e-6, head_weight, head_bias, 1, prev_agg, prev_count, "mean")
    yield "prm_step_score", (hidden, None, 1e-6, head_weight[:1], None, 0, prev_agg, prev_count, "prod")


@pytest.mark.parametrize("name,args", list(opcheck_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.ttsearch, name).default, args)


# ----------------------------------------------------------------------------- validation


def test_bad_block_id_in_used_entry():
    k_cache, v_cache, tables, _, lens = make_paged([20, 5], 1, 32, torch.float32)
    tables[0, 1] = k_cache.shape[0]  # the second block of a 20-token context is used
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match="block id"):
        ops.paged_decode_attention(torch.randn(2, 1, 32), k_cache, v_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="block id"):
        ops.paged_extend_attention(torch.randn(2, 1, 32), k_cache, v_cache, tables,
                                   torch.tensor([0, 1, 2]), lens, 0.2)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_mismatched_dtypes():
    k_cache, v_cache, tables, _, lens = make_paged([5], 1, 32, torch.float32)
    before = k_cache.clone(), v_cache.clone()
    query = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.2)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_extend_attention(query, k_cache, v_cache, tables, torch.tensor([0, 1]), lens, 0.2)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ----------------------------------------------------------------------------- host-side checks


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def test_check_indices_false_reads_no_tensor_data():
    """Meta tensors have shapes but no data: an op that read an index tensor would raise."""
    k_cache, v_cache, tables, _, lens = make_paged([20, 5], 2, 32, torch.float32)
    query = torch.randn(2, 4, 32)
    prefix_tables, prefix_lens, seq_group = tables[:1, :1].clone(), torch.tensor([BLOCK], dtype=torch.int32), torch.tensor([0, -1], dtype=torch.int32)
    kv_cache = torch.randn(2, 1, 4, BLOCK, 2, 32)
    calls = {
        "store_kv": lambda m, **kw: ops.store_kv(m(torch.randn(2, 2, 32)), m(torch.randn(2, 2, 32)), m(k_cache), m(v_cache),
                                                  m(torch.tensor([0, 1])), **kw),
        "decode": lambda m, **kw: ops.paged_decode_attention(m(query), m(k_cache), m(v_cache), m(tables), m(lens), 0.2, **kw),
        "extend": lambda m, **kw: ops.paged_extend_attention(m(query), m(k_cache), m(v_cache), m(tables),
                                                              m(torch.tensor([0, 1, 2])), m(lens), 0.2, **kw),
        "cascade": lambda m, **kw: ops.cascade_decode_attention(m(query), m(k_cache), m(v_cache), m(tables), m(lens),
                                                                m(prefix_tables), m(prefix_lens), m(seq_group), 0.2, **kw),
        "copy_blocks": lambda m, **kw: ops.copy_blocks(m(kv_cache), m(torch.tensor([0])), m(torch.tensor([1])), **kw),
    }
    for name, call in calls.items():
        call(lambda t: t)  # the same arguments are valid with real data
        call(_meta, check_indices=False)
        with pytest.raises((NotImplementedError, RuntimeError)):  # the checks do read data
            call(_meta)


def test_check_metadata_names_the_bad_entry():
    k_cache, _, tables, _, lens = make_paged([20, 5], 1, 32, torch.float32)
    num_blocks = k_cache.shape[0]
    ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, 1]), torch.tensor([0, 1, 2], dtype=torch.int32))
    bad = tables.clone()
    bad[0, 1] = num_blocks
    with pytest.raises(ValueError, match=f"block id {num_blocks} out of range"):
        ops.check_metadata(num_blocks, BLOCK, bad, lens)
    with pytest.raises(ValueError, match="slot out of range"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, num_blocks * BLOCK]))
    with pytest.raises(ValueError, match="query_start_loc must rise"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, torch.tensor([0, 1]), torch.tensor([0, 2, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="seq_group is missing"):
        ops.check_metadata(num_blocks, BLOCK, tables, lens, prefix_tables=tables[:1, :1].clone(),
                           prefix_lens=torch.tensor([BLOCK], dtype=torch.int32))
    with pytest.raises(ValueError, match="appears twice"):
        ops.check_block_copies(num_blocks, torch.tensor([0, 1]), torch.tensor([2, 2]))


def test_a_forward_checks_its_metadata_once_on_the_host(tiny_checkpoints, monkeypatch):
    """Every layer's ops skip the index checks: the model runner ran them once, on host tensors."""
    from ttsearch.engine.engine import Engine
    from ttsearch.engine.sampler import SamplingParams

    engine = Engine(str(tiny_checkpoints["llama3"]), dtype=torch.float32, kv_cache_bytes=1 << 22, block_size=BLOCK,
                    progress=False)
    layers = engine.model.config.num_layers
    assert layers > 1
    checked: list[torch.device] = []
    real = checks.check_block_table_indices

    def counting(block_tables, *args):
        checked.append(block_tables.device)
        return real(block_tables, *args)

    monkeypatch.setattr(checks, "check_block_table_indices", counting)
    root = engine.add(list(range(3, 3 + 2 * BLOCK + 3)))  # an extend forward
    beams = engine.fork(root, 3)
    engine.step(beams, [SamplingParams(temperature=1.0, seed=i) for i in range(3)])  # a cascade decode forward
    engine.step(beams[:1])  # a plain decode forward
    assert checked == [torch.device("cpu")] * 3  # once per forward, not once per layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_forward_never_waits_for_the_device(tiny_checkpoints):
    """Extend, cascade decode and plain decode forwards with CUDA's sync debug mode set to
    error: any device-to-host copy or synchronization in any layer raises. Then whole engine
    steps, sampling included, in warn mode: the one synchronization each makes is reading
    its sampled tokens back (``sampler.py``'s ``tokens.tolist()``)."""
    import inspect
    import warnings

    from ttsearch.engine import sampler
    from ttsearch.engine.engine import Engine
    from ttsearch.engine.sampler import SamplingParams

    engine = Engine(str(tiny_checkpoints["llama3"]), dtype=torch.bfloat16, device="cuda", kv_cache_bytes=1 << 22,
                    block_size=BLOCK, progress=False)
    root = engine.add(list(range(3, 3 + 2 * BLOCK + 3)))
    beams = engine.fork(root, 3)
    runner = engine.runner
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.forward(beams, [[5], [6], [7]], logits=False)  # cascade decode, with a copy-on-write of the tail
        runner.forward(beams[:1], [[8]], logits=False)  # plain decode
        runner.forward(beams[1:2], [[9, 10, 11]], logits=False)  # extend
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    sampling = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1), SamplingParams(temperature=1.2, seed=2),
                SamplingParams()]
    engine.append_batch(beams, [[12], [13], [14]])  # next-token logits for every beam
    engine.step(beams, sampling)  # every CUDA graph this test replays is captured
    engine.step(beams[:1], sampling[:1])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step(beams, sampling)  # cascade decode
            engine.step(beams[:1], sampling[:1])  # plain decode
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [(w.filename, w.lineno) for w in caught if "synchronizing" in str(w.message)]
    source, first = inspect.getsourcelines(sampler.sample)
    tolist = first + next(i for i, line in enumerate(source) if "tokens.tolist()" in line)
    assert syncs and set(syncs) == {(sampler.__file__, tolist)}, syncs
