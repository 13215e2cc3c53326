"""sample_tokens: per row temperature, top-k, top-p and an inverse-CDF draw, one program per
row, never sorting the vocabulary (the rule of ``reference.sample_tokens``).

Thresholds are found by searching float bit patterns, each pass over the row testing SPLIT
candidate cutoffs at once (a 17-way bisection: 8 passes span 32 bits), in the spirit of
FlashInfer's sampling kernels: the top-k cutoff is the largest logit key with at
least k logits at or above it, exact; the nucleus's lowest probability is the smallest one
whose mass strictly above stays below top_p. Then ties of that probability are kept in
token-id order, and one cumulative scan in token-id order makes the draw. Masses are
float32 sums here, so a token can differ from the reference's where a sum lies within
float32 rounding of top_p or of the draw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _key(x):
    """An int32 that orders as the float32 ``x`` does (-0.0 taken as +0.0)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _probs(row_ptr, idx, V, temperature, min_key, shift, scale):
    """Probabilities at ``idx``: softmax of the scaled logits with key >= min_key (0 elsewhere)."""
    x = tl.math.div_rn(tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32), temperature)
    keep = (idx < V) & (_key(x) >= min_key)
    return tl.where(keep, tl.exp(x - shift) * scale, 0.0)


@triton.jit
def _in_nucleus(p, lowest, ahead, ties, top_p):
    """One block's probabilities, 0 outside the nucleus, and its count of ties of ``lowest``
    (``ties`` of them came in earlier blocks: equal ones are kept lowest id first)."""
    tie = (p == lowest).to(tl.int32)
    rank = ties + tl.cumsum(tie, 0) - tie
    keep = (p > lowest) | ((tie == 1) & ((ahead + (rank + 1).to(tl.float32) * lowest) - lowest < top_p))
    return tl.where(keep, p, 0.0), tl.sum(tie, 0)


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, u_ptr, out_ptr, stride, V,
    BLOCK: tl.constexpr, SPLIT: tl.constexpr,
):
    # logits / temperature rounded as torch divides (div_rn: the GPU's `/` may approximate), so
    # the top-k cutoff and its ties are the reference's exactly
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    temperature = tl.load(temp_ptr + row)
    k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row)
    u = tl.load(u_ptr + row)
    offs = tl.arange(0, BLOCK)

    if (temperature == 0) | (k == 1):  # greedy: the first index of the largest logit
        best = float("-inf")
        best_i = 0
        for start in range(0, V, BLOCK):
            x = tl.load(row_ptr + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
            m = tl.max(x, 0)
            i = tl.min(tl.where(x == m, start + offs, V), 0)
            best_i = tl.where(m > best, i, best_i)
            best = tl.maximum(best, m)
        tl.store(out_ptr + row, best_i.to(tl.int64))
    else:
        # top-k: the largest key with at least k scaled logits at or above it
        min_key = -(2**31)  # below every key: all kept
        if (k > 0) & (k < V):
            lo = tl.full((), 2**31 - 1, tl.int64)
            hi = tl.full((), -(2**31), tl.int64)
            for start in range(0, V, BLOCK):
                idx = start + offs
                key = _key(tl.math.div_rn(tl.load(row_ptr + idx, mask=idx < V, other=0.0).to(tl.float32), temperature))
                lo = tl.minimum(lo, tl.min(tl.where(idx < V, key, 2**31 - 1), 0).to(tl.int64))
                hi = tl.maximum(hi, tl.max(tl.where(idx < V, key, -(2**31)), 0).to(tl.int64))
            while lo < hi:  # SPLIT candidate cutoffs per pass over the row
                step = tl.maximum((hi - lo + 1) // (SPLIT + 1), 1)
                cands = lo + (tl.arange(0, SPLIT) + 1).to(tl.int64) * step
                counts = tl.zeros([SPLIT], tl.int64)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    x = tl.load(row_ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
                    key = _key(tl.math.div_rn(x, temperature))
                    hit = (key[:, None] >= cands[None, :]) & (idx < V)[:, None]
                    counts += tl.sum(hit.to(tl.int64), 0)
                passed = tl.sum(((counts >= k) & (cands <= hi)).to(tl.int64), 0)  # a prefix of cands
                hi = tl.minimum(hi, lo + (passed + 1) * step - 1)
                lo = lo + passed * step
            min_key = lo.to(tl.int32)

        # softmax over the kept logits
        shift = float("-inf")
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = tl.math.div_rn(tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32), temperature)
            shift = tl.maximum(shift, tl.max(tl.where(_key(x) >= min_key, x, float("-inf")), 0))
        total = 0.0
        for start in range(0, V, BLOCK):
            total += tl.sum(_probs(row_ptr, start + offs, V, temperature, min_key, shift, 1.0), 0)
        scale = 1.0 / total

        # top-p: the smallest probability (bit pattern) whose mass strictly above is < top_p
        lowest = 0.0  # top_p >= 1: every token of positive probability
        ahead = 0.0
        if top_p < 1:
            # the largest bit pattern c with mass(p > c) >= top_p (-1 if none); the lowest kept
            # probability is the smallest one above it
            plo = -1
            phi = 0
            for start in range(0, V, BLOCK):
                p = _probs(row_ptr, start + offs, V, temperature, min_key, shift, scale)
                phi = tl.maximum(phi, tl.max(p.to(tl.int32, bitcast=True), 0))
            while plo < phi:
                step = tl.maximum((phi - plo + 1) // (SPLIT + 1), 1)
                cands = plo + (tl.arange(0, SPLIT) + 1) * step
                mass = tl.zeros([SPLIT], tl.float32)
                for start in range(0, V, BLOCK):
                    p = _probs(row_ptr, start + offs, V, temperature, min_key, shift, scale)
                    above = p.to(tl.int32, bitcast=True)[:, None] > cands[None, :]
                    mass += tl.sum(tl.where(above, p[:, None], 0.0), 0)
                passed = tl.sum(((mass >= top_p) & (cands <= phi)).to(tl.int32), 0)
                phi = tl.minimum(phi, plo + (passed + 1) * step - 1)
                plo = plo + passed * step
            lowest = float("inf")
            for start in range(0, V, BLOCK):
                p = _probs(row_ptr, start + offs, V, temperature, min_key, shift, scale)
                lowest = tl.minimum(lowest, tl.min(tl.where(p.to(tl.int32, bitcast=True) > plo, p, float("inf")), 0))
            for start in range(0, V, BLOCK):
                p = _probs(row_ptr, start + offs, V, temperature, min_key, shift, scale)
                ahead += tl.sum(tl.where(p > lowest, p, 0.0), 0)

        # the draw: the first token whose cumulative kept mass exceeds u * total kept
        kept_total = 0.0
        ties = 0
        for start in range(0, V, BLOCK):
            p = _probs(row_ptr, start + offs, V, temperature, min_key, shift, scale)
            p, block_ties = _in_nucleus(p, lowest, ahead, ties, top_p)
            kept_total += tl.sum(p, 0)
            ties += block_ties
        draw = u * kept_total
        cum = 0.0
        ties = 0
        picked = V - 1
        for start in range(0, V, BLOCK):
            idx = start + offs
            p = _probs(row_ptr, idx, V, temperature, min_key, shift, scale)
            p, block_ties = _in_nucleus(p, lowest, ahead, ties, top_p)
            crossed = (cum + tl.cumsum(p, 0) > draw) & (idx < V)
            picked = tl.minimum(picked, tl.min(tl.where(crossed, idx, V - 1), 0))
            cum += tl.sum(p, 0)
            ties += block_ties
        tl.store(out_ptr + row, picked.to(tl.int64))


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return tokens
    # bf16 / fp16 logits are widened to float32 as they are loaded (exactly, as the reference
    # widens them), never copied: a float32 copy of B x vocab would cost more than the draw
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    # [BLOCK, SPLIT] tiles in registers on a GPU: 2 KiB of logits per block (float32 at 1024
    # spills); the interpreter pays per block, not per value
    block = min(2048 // logits.element_size() if logits.is_cuda else 8192, triton.next_power_of_2(vocab))
    _sample_kernel[(batch,)](
        logits, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(), u.contiguous(), tokens,
        logits.stride(0), vocab, BLOCK=block, SPLIT=16, num_warps=8,
    )
    return tokens
