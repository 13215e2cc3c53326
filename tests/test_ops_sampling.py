"""sample_tokens, ``cpp`` and ``triton`` against the reference body (see ops_cases.py).

``cpp``: the public op on CPU tensors, dispatched to ttsearch._C (skipped when it is not
loaded; TTSEARCH_OPS=fast makes a missing extension an error instead). ``triton``: the
launchers called directly, on CPU tensors through Triton's interpreter (kept small: it is
slow) and natively on a CUDA machine. float32 within 1e-5, bf16/fp16 within a rounding
step of the dtype (the rounding points are the reference's, the float32 sums' order is not).

Sampling is compared token for token. A fast sampler may pick another token than the
reference only where float rounding decides: the draw within 1e-6 of a CDF boundary between
the two tokens, or a token whose mass ahead lies within 1e-6 of top_p (in or out of the
nucleus by rounding). Every differing row must be explained so, by recomputing the
reference's distribution in float64; the counts are printed (-s).
"""

from __future__ import annotations

import pytest
import torch

import ttsearch.ops as ops
from ops_cases import FUSED_DEVICE as DEVICE
from ops_cases import HAS_CUDA, fused_impl, randn  # noqa: F401  (fused_impl: the ``impl`` fixture)
from ops_cases import run_fused as run
from ops_cases import sampling_module as sampling
from ttsearch.ops import reference



SMOLLM2_VOCAB = 49152


BOUNDARY = 1e-6  # how close to a boundary float rounding may decide


def sampling_batch(rows: int, vocab: int, seed: int, ties: bool = False):
    """Random logits and per-row settings: top-k and top-p off and on, greedy rows, and the
    draw over [0, 1). ``ties``: logits on a coarse grid (ties everywhere, at the k-th logit,
    the nucleus edge and the argmax)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 4.0, 8.0])[torch.randint(0, 4, (rows, 1), generator=gen)]
    logits = torch.randn(rows, vocab, generator=gen) * scale
    if ties:
        logits = (logits * 2).round() / 2
    temperature = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.5])[torch.randint(0, 5, (rows,), generator=gen)]
    top_k = torch.tensor([0, 0, 1, 5, 50, vocab // 2, vocab + 3])[torch.randint(0, 7, (rows,), generator=gen)]
    top_p = torch.tensor([1.0, 1.0, 0.95, 0.9, 0.6, 0.3])[torch.randint(0, 6, (rows,), generator=gen)]
    u = torch.rand(rows, generator=gen)
    return logits, temperature, top_k, top_p, u


def special_rows(vocab: int):
    """A row with all mass on one token, a flat row, and draws at the ends of [0, 1)."""
    one_hot = torch.full((vocab,), -1e4)
    one_hot[vocab // 3] = 5.0
    flat = torch.zeros(vocab)
    rows = [one_hot, one_hot, flat, flat, flat]
    temperature = torch.tensor([1.0, 0.5, 1.0, 1.0, 2.0])
    top_k = torch.tensor([0, 3, 0, 0, 7])
    top_p = torch.tensor([0.5, 1.0, 0.5, 1.0, 0.999])
    u = torch.tensor([0.3, 0.9999999, 0.0, 0.9999999, 0.5])
    return torch.stack(rows), temperature, top_k, top_p, u


def reference_distribution(logits, temperature, top_k, top_p, toggle=()):
    """The reference's kept probabilities for one sampled row in float64, and each token's
    mass ahead in the nucleus order (float64). ``toggle``: tokens moved in/out of the nucleus."""
    scaled = logits / temperature
    scaled = reference.top_k_filter(scaled[None], top_k[None])[0]
    probs = torch.softmax(scaled, -1).double()
    order = torch.sort(-probs, stable=True).indices
    ahead = torch.empty_like(probs)
    ahead[order] = probs[order].cumsum(0) - probs[order]
    kept = (ahead < top_p) if top_p < 1 else torch.ones_like(probs, dtype=torch.bool)
    for t in toggle:
        kept[t] = ~kept[t]
    return torch.where(kept, probs, 0.0), ahead


def explain(row: int, got: int, want: int, batch) -> str | None:
    """Why a fast sampler may pick ``got`` where the reference picks ``want`` in ``row``: the
    draw within BOUNDARY of a CDF boundary between them, possibly after moving tokens whose
    mass ahead is within BOUNDARY of top_p in or out of the nucleus. None: unexplained."""
    logits, temperature, top_k, top_p, u = (t[row] for t in batch)
    if temperature == 0 or top_k == 1:
        return None  # greedy: exact
    kept, ahead = reference_distribution(logits, temperature, top_k, float(top_p))
    borderline = ((ahead - float(top_p)).abs() <= BOUNDARY).nonzero().flatten().tolist() if top_p < 1 else []
    for toggle in [[]] + ([borderline] if borderline else []):
        probs, _ = reference_distribution(logits, temperature, top_k, float(top_p), toggle)
        cdf = probs.cumsum(0) / probs.sum()
        lo, hi = min(got, want), max(got, want)
        if ((cdf[lo:hi] - float(u)).abs() <= BOUNDARY).any():
            return "draw at a CDF boundary" + (" after a nucleus edge moved" if toggle else "")
    return None


def test_explain_accepts_only_rounding_at_a_boundary():
    """The allowance above is no blanket: a draw on a CDF boundary explains the neighbouring
    token, a draw inside a token's interval explains nothing else."""
    logits = randn(1, 100, seed=9)
    settings = [torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0])]
    probs, _ = reference_distribution(logits[0], settings[0][0], settings[1][0], 1.0)
    cdf = probs.cumsum(0) / probs.sum()
    on_edge = (logits, *settings, cdf[40:41].float())
    inside = (logits, *settings, ((cdf[40:41] + cdf[41:42]) / 2).float())
    assert explain(0, 41, 40, on_edge) is not None
    assert explain(0, 42, 41, inside) is None and explain(0, 40, 41, inside) is None


def check_sampling(impl, batch):
    _, got = run(impl, "sample_tokens", *batch)
    want = reference.sample_tokens(*batch)
    assert got.dtype == torch.int64 and got.shape == want.shape
    differ = (got != want).nonzero().flatten().tolist()
    reasons = {r: explain(r, int(got[r]), int(want[r]), batch) for r in differ}
    unexplained = [r for r, why in reasons.items() if why is None]
    print(f"{impl}: {len(differ)} of {len(got)} rows differ from the reference, {len(unexplained)} unexplained: {reasons}")
    assert not unexplained, f"rows {unexplained}: got {got[unexplained].tolist()}, want {want[unexplained].tolist()}"
    return got


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("vocab", [7, 320])
def test_sample_tokens_small_vocab(impl, vocab, ties):
    rows = 400 if impl == "cpp" or HAS_CUDA else 16
    check_sampling(impl, sampling_batch(rows, vocab, seed=vocab, ties=ties))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_sample_tokens_smollm2_vocab(impl, ties):
    if impl == "cpp" or HAS_CUDA:
        batch = sampling_batch(256, SMOLLM2_VOCAB, seed=11, ties=ties)
    else:  # a few rows through the interpreter: top-k and top-p each alone and together, and greedy
        logits, *_, u = sampling_batch(4, SMOLLM2_VOCAB, seed=11, ties=ties)
        batch = (logits, torch.tensor([0.7, 1.0, 1.5, 0.0]), torch.tensor([50, 0, SMOLLM2_VOCAB // 2, 0]),
                 torch.tensor([1.0, 0.6, 0.95, 1.0]), u)
    check_sampling(impl, batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_tokens_widens_half_logits(impl, dtype):
    """bf16 / fp16 logits (the model's own, unconverted) sample exactly as their float32
    widening does; a vocabulary of 333 also takes the widening's scalar tail."""
    rows = 64 if impl == "cpp" or HAS_CUDA else 4
    logits, temperature, top_k, top_p, u = sampling_batch(rows, 333, seed=3)
    half = logits.to(dtype)
    _, got = run(impl, "sample_tokens", half, temperature, top_k, top_p, u)
    _, wide = run(impl, "sample_tokens", half.float(), temperature, top_k, top_p, u)
    assert got.tolist() == wide.tolist()


def test_sample_tokens_widens_half_logits_without_a_copy(impl):
    """The Triton sampler widens bf16 / fp16 rows as it loads them: it makes no float32 copy
    of the batch's logits (B x vocab: more bytes than the draw reads at a large batch)."""
    if impl != "triton":
        pytest.skip("the C++ sampler widens one row at a time inside the op")
    from torch.utils._python_dispatch import TorchDispatchMode

    logits, temperature, top_k, top_p, u = sampling_batch(4, 333, seed=3)
    made: list[tuple[torch.dtype, int]] = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.extend((t.dtype, t.numel()) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor))
            return out

    for dtype in (torch.bfloat16, torch.float16):
        half = logits.to(dtype).to(DEVICE)
        settings = [t.to(DEVICE) for t in (temperature, top_k, top_p, u)]
        made.clear()
        with Allocations():
            sampling.sample_tokens(half, *settings)
        assert made and not [m for m in made if m[0] == torch.float32 and m[1] >= half.numel()], made


def test_sample_tokens_nucleus_within_the_candidates(impl):
    """Peaked rows whose nuclei lie within the reference's top-512 candidates (so it sorts no
    whole row) beside flat rows without top-p, which keep every token."""
    logits, temperature, top_k, top_p, u = sampling_batch(8, 2000, seed=5)
    logits[:4] *= 20 / logits[:4].std(-1, keepdim=True)
    logits[4:] *= 0.1
    temperature, top_k = torch.tensor([1.0, 0.7, 1.0, 1.2] * 2), torch.tensor([0, 0, 100, 0, 0, 0, 1500, 0])
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.99, 1.0, 1.0, 1.0, 1.0])
    batch = logits, temperature, top_k, top_p, u
    assert reference.sample_tokens(*batch).tolist() == old_sample(*batch)
    check_sampling(impl, batch)


def test_sample_tokens_special_rows(impl):
    batch = special_rows(SMOLLM2_VOCAB if impl == "cpp" else 300)
    got = check_sampling(impl, batch)
    assert got[:2].tolist() == [batch[0].shape[1] // 3] * 2  # all the mass on one token
    assert got[2] == 0 and got[3] == batch[0].shape[1] - 1  # flat: the draw's ends


def test_sample_tokens_reference_is_the_old_sampler():
    """The reference body is the engine's sampler as it was (ttsearch/engine/sampler.py before
    the op), token for token on batches without ties (whose order torch.topk left open)."""
    for seed, vocab in [(1, SMOLLM2_VOCAB), (2, 320), (3, 1000)]:
        logits, temperature, top_k, top_p, u = sampling_batch(32, vocab, seed=seed)
        assert reference.sample_tokens(logits, temperature, top_k, top_p, u).tolist() == old_sample(
            logits, temperature, top_k, top_p, u)
        # every row samples, at one temperature (the old sampler divided by a Python float)
        temperature, top_k = torch.full_like(temperature, 0.8), torch.where(top_k == 1, 0, top_k)
        assert reference.sample_tokens(logits, temperature, top_k, top_p, u).tolist() == old_sample(
            logits, temperature, top_k, top_p, u)


def old_sample(logits, temperature, top_k, top_p, u):
    """ttsearch/engine/sampler.py's sample() before the op, on tensors (the draws given)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i in range(len(logits)) if not (temperature[i] == 0 or top_k[i] == 1)]
    if rows:
        idx = torch.tensor(rows)
        temperatures = [float(temperature[i]) for i in rows]
        sub = logits if len(rows) == len(logits) else logits[idx]
        if len(set(temperatures)) == 1:
            sub = sub / temperatures[0]
        else:
            sub = sub / torch.tensor(temperatures)[:, None]
        ks = [int(top_k[i]) for i in rows]
        if any(ks):
            vocab = sub.shape[1]
            k = torch.tensor([k if 0 < k < vocab else vocab for k in ks])
            kth = sub.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
            sub = sub.masked_fill(sub < kth, float("-inf"))
        probs = torch.softmax(sub, dim=-1)
        ps = [float(top_p[i]) for i in rows]
        if not all(p >= 1 for p in ps):
            p_col = torch.tensor(ps)[:, None]
            k = min(512, probs.shape[1])
            sorted_probs, order = probs.topk(k, dim=-1)
            if k < probs.shape[1] and bool((sorted_probs.sum(-1, keepdim=True) < p_col).any()):
                sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= p_col, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
        cdf = probs.cumsum(dim=-1)
        picked = torch.searchsorted(cdf, (u[idx] * cdf[:, -1])[:, None], right=True).squeeze(1)
        tokens[idx] = picked.clamp(max=logits.shape[1] - 1)
    return tokens.tolist()


def test_sample_tokens_checks_its_arguments():
    logits, temperature, top_k, top_p, u = sampling_batch(4, 50, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        ops.sample_tokens(logits, temperature, top_k, top_p * 0, u)
    with pytest.raises(ValueError, match="logits"):
        ops.sample_tokens(logits.double(), temperature, top_k, top_p, u)
    assert ops.sample_tokens(logits, temperature, top_k, top_p, u).shape == (4,)
