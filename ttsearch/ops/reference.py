"""Pure-torch reference bodies of every ttsearch op.

These are the oracle for the fast implementations and what runs when no fast one is
registered for a device (or when ``TTSEARCH_OPS=reference``). They favour clarity over
speed, but stay vectorized where that costs no clarity.

Cache layout (as ``ttsearch.engine.kv_cache`` allocates it): a layer's K or V pool is
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's slot is
``block_id * block_size + offset``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttsearch.aggregation import update_aggregate
from ttsearch.ops.quantized import quantized_linear  # noqa: F401  (GGUF's block formats live there)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[T, Hkv, D]`` into the pools at ``slot_mapping`` ``[T]``;
    slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_flat = k_cache.view(-1, *k_cache.shape[2:])
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    k_flat[slots] = key[keep].to(k_cache.dtype)
    v_flat[slots] = value[keep].to(v_cache.dtype)


def gather_context(
    cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> torch.Tensor:
    """``[B, max_len, Hkv, D]``: each sequence's first ``max_len`` cached tokens, in order.
    Table entries past a sequence's length may hold any value; they are clamped and masked."""
    block_size = cache.shape[1]
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].clamp(0, cache.shape[0] - 1).long()
    gathered = cache[tables]  # [B, nb, bs, Hkv, D]
    return gathered.flatten(1, 2)[:, :max_len]


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence: ``query [B, H, D]`` attends to the sequence's
    ``context_lens[b]`` cached tokens. Returns ``[B, H, D]``."""
    batch = query.shape[0]
    if batch == 0:
        return torch.empty_like(query)
    max_len = int(context_lens.max())
    keys = gather_context(k_cache, block_tables, max_len).transpose(1, 2)
    values = gather_context(v_cache, block_tables, max_len).transpose(1, 2)
    positions = torch.arange(max_len, device=query.device)
    mask = (positions[None, :] < context_lens[:, None].to(positions.device))[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),
        keys.to(query.dtype),
        values.to(query.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _attend_with_lse(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32 that also returns the log-sum-exp of the scores.

    ``q [..., rows, D]`` (already scaled), ``keys``/``values [..., keys, D]``, ``visible``
    broadcastable to ``[..., rows, keys]`` (None: all). Returns ``(out [..., rows, D],
    lse [..., rows])``; a row that sees no key gets ``out = 0`` and ``lse = -inf``, so it
    carries no weight when merged."""
    scores = q @ keys.transpose(-1, -2)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1)
    probs = (scores - lse.unsqueeze(-1)).exp()
    if visible is not None:
        probs = torch.where(visible, probs, 0.0)  # (-inf) - (-inf) is NaN in an empty row
    return probs @ values, lse


def cascade_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    prefix_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_group: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention with a tree of shared prefixes (multi-level cascade attention): the
    same result as ``paged_decode_attention(query, k_cache, v_cache, block_tables,
    context_lens, scale)``.

    Prefix node ``g`` holds ``prefix_lens[g]`` tokens (whole blocks) in
    ``prefix_tables[g]``. Row ``b`` of ``seq_group [B, L]`` lists the nodes on sequence
    ``b``'s path, outermost first, then -1: they tile the start of its context in that
    order (each node's tokens follow those of the nodes before it, and its block table
    holds the node's blocks there). A 1-D ``seq_group [B]`` is the one-level case, L = 1:
    one group (or -1) per sequence. Attention splits at the nodes' boundaries:

    1. per node and kv head, one batched product of all its members' query heads
       ``[members x heads_per_kv, D]`` against the node's keys ``[P, D]`` — each node's
       blocks are read once for every sequence below it, not once per sequence;
    2. each sequence's own suffix, from the end of its path to its context length (the
       whole context for a sequence in no node), which may be empty;

    merged per (sequence, head) by log-sum-exp over its nodes and its suffix. Computed in
    float32; ``query [B, H, D]`` -> ``[B, H, D]`` in the query's dtype."""
    batch, num_heads, dim = query.shape
    if batch == 0:
        return torch.empty_like(query)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_heads = num_heads // kv_heads
    q = query.float().mul(scale).view(batch, kv_heads, group_heads, dim)
    path = (seq_group if seq_group.dim() == 2 else seq_group[:, None]).long()  # [B, L]
    levels = path.shape[1]
    ctx = context_lens.long()
    node_lens = torch.zeros_like(path)  # tokens of b's context served by its node at each level
    if prefix_lens.numel():
        node_lens = torch.where(path >= 0, prefix_lens.long()[path.clamp(min=0)], 0)
    own_prefix = node_lens.sum(1)

    # Partials per (sequence, part): parts 0..L-1 are the path's nodes, part L the suffix.
    # A part that sees no key keeps out = 0, lse = -inf: it carries no weight in the merge.
    out = torch.zeros(batch, levels + 1, kv_heads, group_heads, dim, device=query.device)
    lse = torch.full((batch, levels + 1, kv_heads, group_heads), float("-inf"), device=query.device)

    # 2. each sequence's own suffix: gather the table columns from its path's end on
    suffix_lens = ctx - own_prefix
    max_suffix = int(suffix_lens.max())
    if max_suffix > 0:
        num_cols = -(-max_suffix // block_size)
        cols = own_prefix[:, None] // block_size + torch.arange(num_cols, device=query.device)
        ids = block_tables.long().gather(1, cols.clamp(max=block_tables.shape[1] - 1))
        ids = ids.clamp(0, k_cache.shape[0] - 1)  # entries past a context: masked below
        keys = k_cache[ids].flatten(1, 2)[:, :max_suffix].float().permute(0, 2, 1, 3)  # [B, Hkv, S, D]
        values = v_cache[ids].flatten(1, 2)[:, :max_suffix].float().permute(0, 2, 1, 3)
        visible = (torch.arange(max_suffix, device=query.device) < suffix_lens[:, None])[:, None, None, :]
        out[:, levels], lse[:, levels] = _attend_with_lse(q, keys, values, visible)

    # 1. each node: one product per kv head for all its members' heads, at whatever level
    for g in range(prefix_lens.shape[0]):
        members, at_level = (path == g).nonzero(as_tuple=True)
        if members.numel() == 0:
            continue
        ids = prefix_tables[g, : int(prefix_lens[g]) // block_size].long()
        keys = k_cache[ids].flatten(0, 1).float().transpose(0, 1)  # [Hkv, P, D]
        values = v_cache[ids].flatten(0, 1).float().transpose(0, 1)
        rows = q[members].transpose(0, 1).reshape(kv_heads, -1, dim)  # [Hkv, members x group_heads, D]
        node_out, node_lse = _attend_with_lse(rows, keys, values, None)
        out[members, at_level] = node_out.view(kv_heads, -1, group_heads, dim).transpose(0, 1)
        lse[members, at_level] = node_lse.view(kv_heads, -1, group_heads).transpose(0, 1)

    # merge each (sequence, head)'s parts by log-sum-exp (a context is never empty, so
    # some part of every sequence saw a key)
    weights = (lse - lse.logsumexp(1, keepdim=True)).exp()
    merged = (out * weights.unsqueeze(-1)).sum(1)
    return merged.view(batch, num_heads, dim).to(query.dtype)


def paged_extend_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Several new tokens per sequence against the sequence's cache (which already holds
    the new tokens' keys and values). Sequence ``b`` owns query rows
    ``query_start_loc[b]:query_start_loc[b+1]``, which are its last tokens, so new token
    ``i`` of ``n`` sits at position ``context_lens[b] - n + i`` and sees keys up to there.
    ``query [T, H, D]`` -> ``[T, H, D]``."""
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for b, ctx in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        n = end - start
        if n == 0:
            continue
        keys = gather_context(k_cache, block_tables[b : b + 1], ctx)[0].transpose(0, 1)
        values = gather_context(v_cache, block_tables[b : b + 1], ctx)[0].transpose(0, 1)
        q_pos = torch.arange(ctx - n, ctx, device=query.device)
        k_pos = torch.arange(ctx, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        out[start:end] = F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1),
            keys.to(query.dtype),
            values.to(query.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def copy_blocks(kv_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer, K and V, of the whole cache
    ``[2, layers, num_blocks, block_size, Hkv, D]`` (copy-on-write of forked tails)."""
    if src.numel():
        kv_cache[:, :, dst.long()] = kv_cache[:, :, src.long()]


def prm_step_score(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    positive_index: int,
    prev_agg: torch.Tensor,
    prev_count: torch.Tensor,
    aggregation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one step per beam from the hidden states at its tag ``hidden [N, hidden]``.

    RMS-norm with ``norm_weight`` (skipped when None), then only the head's rows
    ``head_weight [C, hidden]`` (the candidate tokens' LM-head rows, or a 2-class or value
    head): C = 2 gives P(good) = softmax(logits)[positive_index], C = 1 gives sigmoid.
    The running aggregate over a beam's steps is updated from ``prev_agg``/``prev_count``
    (steps scored before; count 0 means this is the first). Returns float32
    ``(scores [N], aggregates [N])``; full-vocabulary logits are never formed."""
    x = hidden.float()
    if norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x = norm_weight.float() * x.to(hidden.dtype).float()
    logits = x @ head_weight.float().t()
    if head_bias is not None:
        logits = logits + head_bias.float()
    if head_weight.shape[0] == 1:
        scores = torch.sigmoid(logits[:, 0])
    else:
        scores = torch.softmax(logits, dim=-1)[:, positive_index].contiguous()
    return scores, update_aggregate(prev_agg, prev_count, scores, aggregation)


# ----------------------------------------------------------------------------- fused elementwise ops
# The model's own arithmetic (models/llama.py before these ops existed), rounding to the
# tensors' dtype at the same points, so swapping an op in changes no result.


def _rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalize in float32, round to the input dtype, then scale in that dtype (as HF's Llama).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """``out = rms_norm(input) * weight`` over the last dim."""
    out.copy_(_rms_normalize(input, weight, eps))


def fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: ``residual += input``, then ``input = rms_norm(residual) * weight``."""
    residual.add_(input)
    input.copy_(_rms_normalize(residual, weight, eps))


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate-half (GPT-NeoX) RoPE in place on ``query [T, H, D]`` and ``key [T, Hkv, D]``.
    Row ``p`` of ``cos_sin_cache [max_pos, D]`` is ``cos(p * inv_freq) | sin(p * inv_freq)``
    (D/2 each) in the query's dtype."""
    half = query.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).unsqueeze(1)
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).unsqueeze(1)
    for x in (query, key):
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rotated * sin)


def silu_and_mul(out: torch.Tensor, input: torch.Tensor) -> None:
    """``out = silu(input[..., :d]) * input[..., d:]`` (gate, then up: the model's gate_up)."""
    d = input.shape[-1] // 2
    out.copy_(F.silu(input[..., :d]) * input[..., d:])


#: the nucleus almost always lies within the top few hundred tokens: sort only those first
NUCLEUS_CANDIDATES = 512


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` -> int64 ``[B]``; bfloat16 or float16 logits are
    widened to float32 first.

    A row with ``temperature == 0`` or ``top_k == 1`` takes the argmax (the first, on ties).
    Every other row divides by its temperature, keeps its ``top_k`` largest logits (0 or
    >= V: all; ties with the k-th all stay), softmaxes, keeps the nucleus (the tokens whose
    mass strictly ahead of them, in order of falling probability, is below ``top_p``;
    among equal probabilities the lower token id comes first; ``top_p >= 1``: all), and
    draws by inverse CDF in token-id order: the first token whose cumulative mass exceeds
    ``u * total``, ``u [B]`` uniform in [0, 1)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    rows = ((temperature != 0) & (top_k != 1)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return tokens
    vocab = logits.shape[1]
    all_rows = rows.numel() == logits.shape[0]
    sub = logits if all_rows else logits[rows]  # no copy of a batch that all samples
    sub = sub / temperature[rows].to(logits.dtype)[:, None]
    sub = top_k_filter(sub, top_k[rows])
    probs = torch.softmax(sub, dim=-1)
    probs = top_p_filter(probs, top_p[rows].to(probs.dtype))
    cdf = probs.cumsum(dim=-1)
    # right side: the first token whose cumulative mass exceeds the draw, never a zero-mass one
    draw = (u[rows].to(cdf.dtype) * cdf[:, -1])[:, None]
    picked = torch.searchsorted(cdf, draw, right=True).squeeze(1)
    tokens[rows] = picked.clamp(max=vocab - 1)
    return tokens


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """``logits`` below each row's k-th largest set to -inf (k = 0 or >= V: none)."""
    vocab = logits.shape[1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k.long(), vocab)
    if bool((k == vocab).all()):
        return logits
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``probs`` outside each row's nucleus set to 0 (``top_p >= 1``: the row is kept whole)."""
    active = top_p < 1
    if not bool(active.any()):
        return probs
    top_p = top_p[:, None]
    k = min(NUCLEUS_CANDIDATES, probs.shape[1])
    sorted_probs, order = _by_falling_probability(probs, probs.topk(k, dim=-1).indices)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly ahead of each token
    if k < probs.shape[1]:
        # The candidates hold every token the nucleus keeps unless it reaches their lowest
        # probability, whose ties may continue outside them: then sort the whole row.
        first_lowest = (sorted_probs > sorted_probs[:, -1:]).sum(-1, keepdim=True)
        if bool((before.gather(1, first_lowest) < top_p)[active].any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always: 0 mass ahead
    return torch.where(active[:, None], torch.zeros_like(probs).scatter(1, order, kept), probs)


def _by_falling_probability(probs: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates ``order`` (from topk) by falling probability, equal ones by token id
    (topk leaves the order of ties unspecified): ``(probabilities, token ids)``."""
    order = order.sort(dim=-1).values
    values, perm = probs.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return values, order.gather(1, perm)
