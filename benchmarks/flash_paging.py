"""Our paged KV cache in the layout flash-attn's paged decode reads, and that decode.

Both sides store a layer's keys (and values) as ``[num_blocks, block_size, kv_heads, head_dim]``
and address them through a ``block_table [batch, blocks per sequence]`` of int32 block ids, so
the only difference is the block size: flash-attn 2 (``flash_attn_with_kvcache`` and
``flash_attn_varlen_func`` with ``block_table``, up to 2.8) checks "Paged KV cache block size
must be divisible by 256" (``FLASH_ATTN_PAGE_MULTIPLE`` in ``kernels/extend_attention.py``),
and the engine's blocks are 16 tokens.

``repage`` copies a cache into pages of a multiple of our block size (256 for flash-attn):
page j of sequence b holds the tokens of blocks ``j * per_page ... (j + 1) * per_page - 1`` of
its table, and two sequences whose tables hold the same run of block ids there share the page,
so a shared prefix that spans whole pages is stored (and read) once, as in our cache. Each
sequence's last, partial page is allocated whole (a beam's 64 own tokens take a 256-token
page): memory, not reads. A shared prefix that ends inside a page is copied into every
sequence's page, so its last partial page is also read once per sequence (not so in the
benchmark, whose prefixes are 256 and 1,024 tokens). Table entries past a sequence's length
are carried over like the others; the context lengths keep both kernels off them.

Used by ``bench_triton.py`` and tested on the CPU by ``tests/test_flash_paging.py``.
"""

from __future__ import annotations

import inspect

import torch


def repage(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, page_size: int):
    """``(k_pages, v_pages, page_tables)``: the cache in ``page_size``-token pages, shared runs of
    blocks stored once, ``page_tables [batch, ceil(blocks per sequence / blocks per page)]`` int32."""
    block = k_cache.shape[1]
    if page_size <= 0 or page_size % block:
        raise ValueError(f"page_size must be a positive multiple of the block size {block}, got {page_size}")
    per_page = page_size // block
    batch, width = block_tables.shape
    pages_wide = -(-width // per_page)
    # the last page of a row is padded with a zero block past the cache's end
    pad = k_cache.shape[0]
    tables = torch.nn.functional.pad(block_tables.long(), (0, pages_wide * per_page - width), value=pad)
    runs, page_tables = torch.unique(tables.reshape(batch * pages_wide, per_page), dim=0, return_inverse=True)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([cache, cache.new_zeros(1, *cache.shape[1:])])
        return padded[runs].reshape(runs.shape[0], page_size, *cache.shape[2:]).contiguous()

    return gather(k_cache), gather(v_cache), page_tables.reshape(batch, pages_wide).to(torch.int32).contiguous()


def flash_attn_kvcache():
    """flash-attn's ``flash_attn_with_kvcache`` where it is installed and reads a paged cache
    (a ``block_table`` argument), else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    params = inspect.signature(flash_attn_with_kvcache).parameters
    return flash_attn_with_kvcache if "block_table" in params else None


def flash_decode(query, k_pages, v_pages, page_tables, context_lens, scale):
    """One decode step through flash-attn's paged kernel: ``query [B, H, D]`` -> ``[B, H, D]``,
    sequence b attending to its first ``context_lens[b]`` tokens in the pages of ``page_tables[b]``."""
    out = flash_attn_kvcache()(
        query.unsqueeze(1), k_pages, v_pages,
        cache_seqlens=context_lens.to(torch.int32), block_table=page_tables, softmax_scale=scale,
    )
    return out.squeeze(1)
