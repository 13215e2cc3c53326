"""CUDA graphs for decode forwards: each batch-size bucket captured once, then replayed.

A decode step of a small model launches a few hundred small kernels (every layer's norms,
matmuls, RoPE, cache write and attention), and on a GPU the host's time to launch them,
not the device's time to run them, bounds the step. As vLLM and gpt-fast do, a decode
forward (one new token per sequence) is captured into a CUDA graph per batch-size bucket
(``BUCKETS``) the first time a bucket is used, into one memory pool shared by every
bucket, and replayed after that: one launch per step.

A graph replays fixed device addresses and shapes, so the forward reads its inputs from
static buffers sized for the largest bucket, into which each step copies its live batch:

- ``input_ids``, ``positions``, ``slot_mapping`` and ``context_lens`` by row; a batch of
  ``n`` sequences runs in the smallest bucket ``b >= n`` and rows ``n..b-1`` are dummies
  (token 0 at position 0, slot -1, which ``store_kv`` skips, context length 1 on block 0):
  they read a valid block, write nothing, and their outputs are never read;
- ``block_tables`` at a fixed width, the engine's ``ceil(max_model_len / block_size)``
  columns, of which each step copies only the columns its batch uses: the kernels never
  read a table past a sequence's context, and every entry ever stored is a valid block id;
- the shared-prefix tree of cascade attention, padded to fixed maxima per bucket: at most
  ``min(b - 1, max_nodes)`` nodes (a tree of ``b`` sequences has at most ``b - 1`` nodes,
  each shared by 2 or more) and ``max_levels`` levels. Padding nodes have no members, and
  the cascade kernel's programs for a node without members exit at once; a path shorter
  than ``max_levels`` ends in -1, which carries weight 0. A tree over those maxima is
  first cut to fit (``prefix_tree.fit_tree``: the nodes that save the most reads, each with its
  ancestors), which only moves tokens from shared nodes to the sequences' own reads.

Why pad the tree rather than capture plain paged decode only: the engine exists for beam
search, whose decode batches share long prefixes; without the tree, a batch of 256 beams
behind a 512-token prompt reads that prompt 256 times per layer (for a 1B model, 4 GB per
step against 2.5 GB of weights). Every kernel's launch shape (its grid, its split-KV
count from ``kernels/split_kv.py``) follows from the tensors' shapes alone, and those are
fixed per bucket, so the padded tree captures as plain decode does. Each bucket has up to
two graphs, with and without a tree (a batch that shares nothing, and batch-invariant
mode, run the plain decode kernel), and batch-invariant mode, which changes the captured
kernels, keys its own.

The LM head runs after the replay, on the live rows only: next-token logits are a fresh
tensor per step and a forward that wants none (``logits=False``) computes none.

Graphs need CUDA and the Triton kernels: the reference ops read tensor data on the host,
which a capture forbids. ``CudaGraphRunner(capture=False)`` runs the same static-buffer
path eagerly on any device, which lets the CPU test everything here but the capture.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left
from dataclasses import dataclass

import torch

from ttsearch import batch_invariant, ops
from ttsearch.engine.prefix_tree import PrefixTree, fit_tree
from ttsearch.models.llama import ForwardBatch, LlamaModel

#: decode batch sizes captured; a batch runs in the smallest bucket that holds it, and a
#: batch over the largest runs eagerly
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: most shared-prefix nodes a captured cascade decode takes (fewer for buckets of fewer
#: sequences): every node adds ``ceil(bucket / 16)`` programs per kv head and layer that exit
#: at once when it is a padding node
MAX_NODES = 64
#: most levels (nodes on one sequence's path): each adds a float32 partial per sequence and
#: query head to the cascade kernel's scratch
MAX_LEVELS = 8
#: eager forwards on a side stream before a capture: the Triton kernels compile and
#: cuBLAS picks its algorithms outside the graph
WARMUP_RUNS = 2


def use_cuda_graphs(option: bool | None, device: torch.device) -> bool:
    """Whether an engine on ``device`` captures its decode forwards, from its
    ``cuda_graphs`` option: None is on where it can be (CUDA with the Triton kernels),
    True insists (ValueError where it cannot be), False is off."""
    if not (option is None or isinstance(option, bool)):
        raise ValueError(f"cuda_graphs must be True, False or None, got {option!r}")
    why_not = None
    if device.type != "cuda":
        why_not = f"CUDA graphs need a CUDA device, and the engine is on {device}"
    elif ops.IMPLEMENTATIONS.get("cuda") != "triton":
        why_not = ("CUDA graphs need the Triton kernels (ttsearch.kernels), and the CUDA ops run on "
                   f"{ops.IMPLEMENTATIONS.get('cuda')!r}, which reads tensor data on the host and cannot be captured")
    if option is True and why_not:
        raise ValueError(f"cuda_graphs=True: {why_not}")
    return option is not False and why_not is None


def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding ``batch`` sequences; None past the largest."""
    i = bisect_left(buckets, batch)
    return buckets[i] if batch >= 1 and i < len(buckets) else None


def tree_caps(bucket: int, max_nodes: int = MAX_NODES, max_levels: int = MAX_LEVELS) -> tuple[int, int]:
    """(nodes, levels) of the padded tree of a bucket: a tree of ``bucket`` sequences, each
    node shared by at least two, has at most ``bucket - 1`` nodes."""
    return max(0, min(bucket - 1, max_nodes)), max_levels


@dataclass
class StaticLayout:
    """Sizes of the static input buffers, for the largest bucket."""

    max_bucket: int
    max_blocks: int  # block-table columns: ceil(max_model_len / block_size)
    max_nodes: int  # padded tree nodes of the largest bucket
    max_levels: int
    block_size: int

    @property
    def meta_size(self) -> int:
        return self.max_bucket + self.max_nodes + self.max_bucket * self.max_levels


@dataclass
class PaddedDecode:
    """One decode batch as host tensors laid out like the static buffers.

    ``long [3, max_bucket]`` int64: input ids, positions, slots (dummy rows: 0, 0, -1).
    ``meta [meta_size]`` int32: context lengths ``[max_bucket]`` (dummies: 1), prefix
    lengths ``[max_nodes]`` (padding nodes: one block), seq_group ``[max_bucket,
    max_levels]`` (-1 padded). ``tables [bucket, width]`` and ``prefix_tables [nodes,
    width]`` int32: only the columns the batch uses (dummy rows: block 0)."""

    long: torch.Tensor
    meta: torch.Tensor
    tables: torch.Tensor
    prefix_tables: torch.Tensor | None


def pad_decode(input_ids: torch.Tensor, batch: ForwardBatch, bucket: int, layout: StaticLayout) -> PaddedDecode:
    """The live decode ``batch`` (host tensors, checked) and its ``input_ids`` padded to
    ``bucket`` rows and to the static buffers' layout."""
    n = batch.context_lens.shape[0]
    if not (batch.is_decode and input_ids.shape[0] == n and 1 <= n <= bucket <= layout.max_bucket):
        raise ValueError(f"pad_decode: a decode batch of {n} sequences ({input_ids.shape[0]} tokens) "
                         f"does not fit a bucket of {bucket} (largest {layout.max_bucket})")
    if batch.block_tables.shape[1] > layout.max_blocks:
        raise ValueError(f"pad_decode: block tables of {batch.block_tables.shape[1]} columns, "
                         f"over the static {layout.max_blocks}")
    mb, nodes, levels = layout.max_bucket, layout.max_nodes, layout.max_levels
    long = torch.zeros(3, mb, dtype=torch.int64)
    long[2] = -1
    long[0, :n] = input_ids
    long[1, :n] = batch.positions
    long[2, :n] = batch.slot_mapping
    meta = torch.empty(layout.meta_size, dtype=torch.int32)
    lens, prefix_lens = meta[:mb], meta[mb : mb + nodes]
    seq_group = meta[mb + nodes :].view(mb, levels)
    lens.fill_(1)
    lens[:n] = batch.context_lens
    prefix_lens.fill_(layout.block_size)
    seq_group.fill_(-1)
    tables = torch.zeros(bucket, batch.block_tables.shape[1], dtype=torch.int32)
    tables[:n] = batch.block_tables
    prefix_tables = None
    if batch.prefix_tables is not None:
        g, depth = batch.prefix_lens.shape[0], batch.seq_group.shape[1] if batch.seq_group.dim() == 2 else 1
        if g > tree_caps(bucket, nodes, levels)[0] or depth > levels:
            raise ValueError(f"pad_decode: a tree of {g} nodes and {depth} levels is over the caps of bucket "
                             f"{bucket} ({tree_caps(bucket, nodes, levels)}): fit_tree it first")
        if batch.prefix_tables.shape[1] > layout.max_blocks:
            raise ValueError(f"pad_decode: prefix tables of {batch.prefix_tables.shape[1]} columns, "
                             f"over the static {layout.max_blocks}")
        prefix_lens[:g] = batch.prefix_lens
        seq_group[:n, :depth] = batch.seq_group.view(n, depth)
        prefix_tables = batch.prefix_tables.to(torch.int32)
    return PaddedDecode(long, meta, tables, prefix_tables)


@dataclass
class _Graph:
    """One captured bucket: the forward's inputs as views of the static buffers, its
    output, and the graph (None when not capturing)."""

    input_ids: torch.Tensor
    batch: ForwardBatch
    out: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class CudaGraphRunner:
    """Captures and replays the decode forwards of one model on one KV cache.

    ``forward(input_ids, batch)`` takes a decode batch on the host (as the model runner
    builds and checks it) of at most the largest bucket's sequences, with a tree that
    ``fit_tree`` fitted, and returns the new tokens' hidden states ``[n, hidden]`` (a
    fresh tensor). ``replays`` counts the forwards it ran, ``captures`` the graphs it
    holds. With ``capture=False`` it runs the same static buffers eagerly (any device).

    A capture that fails raises with ``strict`` (an engine's ``cuda_graphs=True``);
    otherwise (the default, ``cuda_graphs=None``) it warns once, that forward runs
    eagerly, and so do all later ones (``failed`` holds the reason)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        max_blocks: int,
        buckets: tuple[int, ...] = BUCKETS,
        max_nodes: int = MAX_NODES,
        max_levels: int = MAX_LEVELS,
        capture: bool = True,
        strict: bool = True,
    ):
        buckets = tuple(buckets)
        increasing = list(buckets) == sorted(set(buckets))
        if not (buckets and increasing and all(isinstance(b, int) and b >= 1 for b in buckets)):
            raise ValueError(f"buckets must be increasing positive ints, got {buckets!r}")
        if not (isinstance(max_blocks, int) and max_blocks >= 1):
            raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
        if capture and kv_cache.device.type != "cuda":
            raise ValueError(f"capturing CUDA graphs needs a CUDA KV cache, got one on {kv_cache.device}")
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.buckets = buckets
        self.max_nodes, self.max_levels = max_nodes, max_levels
        self.capture = capture
        self.strict = strict
        self.failed: str | None = None
        self.layout = StaticLayout(buckets[-1], max_blocks, tree_caps(buckets[-1], max_nodes, max_levels)[0],
                                   max_levels, kv_cache.shape[3])
        self.replays = 0
        self._graphs: dict[tuple[int, bool, bool], _Graph] = {}
        self._pool = None
        lay = self.layout
        with torch.inference_mode():  # written in place inside the model's inference mode
            self._long = torch.zeros(3, lay.max_bucket, dtype=torch.int64, device=self.device)
            self._meta = torch.zeros(lay.meta_size, dtype=torch.int32, device=self.device)
            self._tables = torch.zeros(lay.max_bucket, lay.max_blocks, dtype=torch.int32, device=self.device)
            self._prefix_tables = torch.zeros(max(lay.max_nodes, 1), lay.max_blocks, dtype=torch.int32,
                                              device=self.device)

    @property
    def captures(self) -> int:
        return sum(g.graph is not None for g in self._graphs.values())

    def fits(self, batch: int) -> bool:
        return self.failed is None and bucket_for(batch, self.buckets) is not None

    def fit_tree(self, tree: PrefixTree, batch: int) -> PrefixTree:
        """``tree`` (of a decode batch of ``batch`` sequences) cut to its bucket's caps."""
        return fit_tree(tree, *tree_caps(bucket_for(batch, self.buckets), self.max_nodes, self.max_levels))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        n = batch.context_lens.shape[0]
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            raise ValueError(f"a decode batch of {n} sequences is over the largest bucket {self.buckets[-1]}")
        padded = pad_decode(input_ids, batch, bucket, self.layout)
        key = (bucket, padded.prefix_tables is not None, batch_invariant.enabled())
        with _on(self.device):
            graph = self._graphs.get(key)
            if graph is None:
                try:
                    graph = self._capture(key)
                except Exception as exc:
                    if self.strict:
                        raise
                    self.failed = f"capturing a decode batch of bucket {bucket} failed: {exc!r}"
                    warnings.warn(f"CUDA graphs are off for this engine: {self.failed}", stacklevel=3)
                    return self.model.forward(input_ids.to(self.device), batch.to(self.device), self.kv_cache)
            self._load(padded)
            if graph.graph is not None:
                graph.graph.replay()
            else:
                graph.out = self.model.forward(graph.input_ids, graph.batch, self.kv_cache)
            self.replays += 1
            return graph.out[:n].clone()  # the next replay overwrites the graph's output

    def _load(self, padded: PaddedDecode) -> None:
        """Copy a padded batch into the static buffers (on the stream the replay runs on)."""
        self._long.copy_(padded.long, non_blocking=True)
        self._meta.copy_(padded.meta, non_blocking=True)
        rows, cols = padded.tables.shape
        self._tables[:rows, :cols].copy_(padded.tables, non_blocking=True)
        if padded.prefix_tables is not None and padded.prefix_tables.numel():
            rows, cols = padded.prefix_tables.shape
            self._prefix_tables[:rows, :cols].copy_(padded.prefix_tables, non_blocking=True)

    def _views(self, bucket: int, cascade: bool) -> _Graph:
        lay = self.layout
        mb = lay.max_bucket
        nodes = tree_caps(bucket, self.max_nodes, self.max_levels)[0]
        batch = ForwardBatch(
            positions=self._long[1, :bucket],
            slot_mapping=self._long[2, :bucket],
            block_tables=self._tables[:bucket],
            context_lens=self._meta[:bucket],
            query_start_loc=None,
            last_rows=torch.arange(bucket, device=self.device),  # not read by the model
        )
        if cascade:
            batch.prefix_tables = self._prefix_tables[:nodes]
            batch.prefix_lens = self._meta[mb : mb + nodes]
            batch.seq_group = self._meta[mb + lay.max_nodes :].view(mb, lay.max_levels)[:bucket]
        return _Graph(self._long[0, :bucket], batch)

    def _capture(self, key: tuple[int, bool, bool]) -> _Graph:
        bucket, cascade, _ = key
        if cascade and tree_caps(bucket, self.max_nodes, self.max_levels)[0] == 0:
            raise ValueError(f"bucket {bucket} takes no shared-prefix nodes")
        graph = self._views(bucket, cascade)
        if self.capture:
            # Dummy rows only (every slot -1): the warm-up runs and the capture write nothing to the cache.
            n = self.layout.max_bucket
            dummy = ForwardBatch(
                positions=torch.zeros(n, dtype=torch.int64), slot_mapping=torch.full((n,), -1, dtype=torch.int64),
                block_tables=torch.zeros(n, 1, dtype=torch.int32), context_lens=torch.ones(n, dtype=torch.int32),
                query_start_loc=None, last_rows=torch.arange(n),
            )
            self._load(pad_decode(torch.zeros(n, dtype=torch.int64), dummy, n, self.layout))
            # Capturing synchronizes the device, once per bucket; the forwards that replay never do.
            debug_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        self.model.forward(graph.input_ids, graph.batch, self.kv_cache)
                torch.cuda.current_stream(self.device).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph, pool=self._pool, capture_error_mode="thread_local"):
                    graph.out = self.model.forward(graph.input_ids, graph.batch, self.kv_cache)
                graph.graph = cuda_graph
            finally:
                torch.cuda.set_sync_debug_mode(debug_mode)
        self._graphs[key] = graph
        return graph


class _on:
    """``torch.cuda.device(device)`` for a CUDA device, nothing otherwise."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
