"""The engine API: sequences on one paged, forkable KV cache.

    engine = Engine("smollm2-135m")
    seq = engine.add(engine.tokenizer.encode(prompt))     # prefill, reusing cached blocks
    beams = engine.fork(seq, 4)                            # share every block, copy-on-write
    steps = engine.generate_step(beams, SamplingParams(temperature=0.8, seed=1))
    engine.free(seq)

Every public method validates its input before it changes anything: a bad call raises a
clear error and leaves the engine as it was. The forward pass and the cache writes live in
``model_runner.py``; stepping many sequences a token at a time in ``step_writer.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ttsearch import ops
from ttsearch.ops.cpu_isa import has_amx, has_fast_bf16, multiplies_int8
from ttsearch.batch_invariant import set_enabled as set_batch_invariant
from ttsearch.engine.block_manager import BlockManager
from ttsearch.engine.cuda_graphs import CudaGraphRunner, use_cuda_graphs
from ttsearch.engine.kv_cache import allocate_kv_cache, bytes_per_token
from ttsearch.engine.model_runner import ModelRunner
from ttsearch.engine.sampler import (GREEDY, SamplingParams, TokenLogprobs, derive_seed, log_softmax_rows, per_seq,
                                     sample, token_logprobs)
from ttsearch.engine.sequence import Seq
from ttsearch.engine.step_writer import StepResult, StepWriter
from ttsearch.errors import ContextLengthError, InvalidTokenError, UnsupportedArchitectureError
from ttsearch.models.llama import LlamaModel
from ttsearch.models.loader import WEIGHTS, load_checkpoint

DEFAULT_KV_CACHE_BYTES = 1 << 30


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None:
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and has_fast_bf16())
        return torch.bfloat16 if fast_bf16 else torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: expected torch.float32 or torch.bfloat16")
    return dtype


def resolve_weights(weights: str, device: torch.device) -> str:
    """``"packed"`` or ``"dequantized"``: how a GGUF file's quantized matrices run. ``"auto"``
    keeps them packed where that was measured no slower at any batch size: a CPU whose kernels
    multiply them in int8 (AVX512-VNNI, as a Zen 4: about 2.2x at batch 1, 1.2x at 64, at
    parity or ahead at 8-16) and that has no AMX (whose bf16 GEMM on dequantized weights is
    expected to outrun int8 VNNI at search batch sizes). Elsewhere dequantized: on an AVX2 CPU
    packed weights are faster up to batch 4 but slower from 16 rows on, and on a GPU cuBLAS's
    bf16 GEMM is the measured path."""
    if weights == "auto":
        level = ops.IMPLEMENTATIONS["cpu"].removeprefix("cpp-")
        int8 = device.type == "cpu" and multiplies_int8(level) and not has_amx()
        return "packed" if int8 else "dequantized"
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of auto, {', '.join(WEIGHTS)}")
    return weights


class Engine:
    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        block_size: int = 16,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        max_model_len: int | None = None,
        progress: bool = True,
        batch_invariant: bool | None = None,
        cuda_graphs: bool | None = None,
        prefix_caching: bool = True,
        weights: str = "auto",
    ):
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not (isinstance(kv_cache_bytes, int) and kv_cache_bytes > 0):
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        if max_model_len is not None and not (isinstance(max_model_len, int) and max_model_len >= 1):
            raise ValueError(f"max_model_len must be a positive int, got {max_model_len!r}")
        if batch_invariant not in (None, True, False):
            raise ValueError(f"batch_invariant must be True, False or None, got {batch_invariant!r}")
        self.device = torch.device(device)
        # decode forwards replay CUDA graphs: None is on for CUDA (with the Triton kernels), off elsewhere
        self.cuda_graphs = use_cuda_graphs(cuda_graphs, self.device)
        if batch_invariant is not None:  # None keeps the process's mode (TTSEARCH_BATCH_INVARIANT)
            set_batch_invariant(batch_invariant)
        self.dtype = resolve_dtype(dtype, self.device)
        self.name = str(model)  # as given: an alias, a directory or a file
        self.weights = resolve_weights(weights, self.device)
        checkpoint = load_checkpoint(self.name, progress=progress, weights=self.weights)
        self.config = checkpoint.config
        if self.config.head_dim % ops.HEAD_DIM_MULTIPLE:
            raise UnsupportedArchitectureError(
                f"{self.config.source}: head_dim {self.config.head_dim} is not a multiple of "
                f"{ops.HEAD_DIM_MULTIPLE}, which ttsearch's attention ops require"
            )
        self.tokenizer = checkpoint.tokenizer
        self.max_model_len = min(self.config.max_position_embeddings, max_model_len or math.inf)
        self.model = LlamaModel(self.config, checkpoint.weights, self.dtype, self.device, self.max_model_len)
        self.block_size = block_size
        self.kv_cache = allocate_kv_cache(self.config, self.dtype, self.device, block_size, kv_cache_bytes)
        self.blocks = BlockManager(self.kv_cache.shape[2], block_size, prefix_caching=prefix_caching)
        self.block_bytes = block_size * bytes_per_token(self.config, self.dtype)
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        graphs = None
        if self.cuda_graphs:
            graphs = CudaGraphRunner(self.model, self.kv_cache, -(-self.max_model_len // block_size),
                                     strict=cuda_graphs is True)
        self.runner = ModelRunner(self.model, self.kv_cache, self.blocks, self.device, graphs)
        self._live: dict[int, Seq] = {}

    @property
    def tokens_forwarded(self) -> int:
        """Every token a forward has written, all sequences (verifier sequences too)."""
        return self.runner.tokens_forwarded

    # ------------------------------------------------------------------ public API
    def add(self, token_ids: Sequence[int], logits: bool = True) -> Seq:
        """A new sequence holding ``token_ids``. Full blocks already cached for the same
        prefix are reused (``seq.cached_tokens`` says how many tokens); only the rest is
        forwarded. ``logits=False`` skips the next-token logits (a verifier's sequence never
        samples)."""
        return self.add_batch([token_ids], logits)[0]

    def add_batch(self, token_lists: Sequence[Sequence[int]], logits: bool = True) -> list[Seq]:
        """``add`` for many sequences, their uncached parts forwarded in one batch."""
        lists = [self._check_tokens(t, "add") for t in token_lists]
        for tokens in lists:
            self._check_room(len(tokens), "add")
        seqs = [Seq(token_ids=[], block_table=[], wants_logits=logits) for _ in lists]
        if seqs:
            what = f"a prompt of {len(lists[0])} tokens" if len(lists) == 1 else f"{len(lists)} prompts"
            self._prefill(seqs, lists, what)
        return seqs

    def append(self, seq: Seq, token_ids: Sequence[int]) -> None:
        """Extend ``seq`` with ``token_ids``, forwarded against its cached context."""
        self.append_batch([seq], [token_ids])

    def append_batch(
        self,
        seqs: Sequence[Seq],
        token_lists: Sequence[Sequence[int]],
        hidden_at: Sequence[Sequence[int]] | None = None,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Extend many sequences in one forward. With ``hidden_at`` (per sequence, indices
        into its new tokens; negative counts from the end), return the hidden states before
        the final norm at those tokens, ``[total, hidden_size]`` in order; verifiers read
        their scores from them without forming full-vocabulary logits, and pass
        ``logits=False`` so that no next-token logits are formed either."""
        seqs = list(seqs)
        self._check_live(seqs)
        if len(token_lists) != len(seqs):
            raise ValueError(f"append_batch: {len(seqs)} sequences but {len(token_lists)} token lists")
        lists = [self._check_tokens(t, "append_batch") for t in token_lists]
        rows: list[int] = []
        if hidden_at is not None:
            if len(hidden_at) != len(seqs):
                raise ValueError(f"append_batch: {len(seqs)} sequences but {len(hidden_at)} hidden_at lists")
            start = 0
            for tokens, wanted in zip(lists, hidden_at):
                for i in wanted:
                    if not -len(tokens) <= i < len(tokens):
                        raise IndexError(f"append_batch: hidden_at index {i} outside {len(tokens)} new tokens")
                    rows.append(start + i % len(tokens))
                start += len(tokens)
        for seq, tokens in zip(seqs, lists):
            self._check_room(len(seq) + len(tokens), "append_batch")
        needed = sum(self.runner.blocks_needed(s, len(t)) for s, t in zip(seqs, lists))
        self.blocks.require(needed, f"appending to {len(seqs)} sequences")
        hidden = self.runner.forward(seqs, lists, logits)
        return hidden[rows] if hidden_at is not None else None

    def fork(self, seq: Seq, k: int) -> list[Seq]:
        """``k`` children sharing every block of ``seq`` (the partial tail is copied on the
        first write). The parent stays live; free it when it is no longer needed."""
        self._check_live([seq])
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"fork: k must be a positive int, got {k!r}")
        children = [
            Seq(
                token_ids=list(seq.token_ids),
                block_table=list(seq.block_table),
                block_hashes=list(seq.block_hashes),
                lineage=seq.lineage + (seq.forks, i),
                last_logits=seq.last_logits,
                wants_logits=seq.wants_logits,
            )
            for i in range(k)
        ]
        for block in seq.block_table:
            self.blocks.retain(block, k)
        seq.forks += 1
        for child in children:
            self._live[child.seq_id] = child
        return children

    def fork_blocks_needed(self, seqs: Sequence[Seq], n: int) -> int:
        """Blocks that a fresh fork of each of ``seqs`` takes from the pool to write ``n``
        tokens (its partial tail copied, then new blocks): for callers that fork, write and
        free, and must know first that the writes fit."""
        bs = self.block_size
        return sum(-(-(len(s) + n) // bs) - len(s) // bs for s in seqs)

    def free(self, seq: Seq) -> None:
        """Release ``seq``'s blocks now; full ones stay cached for prefix reuse. A preempted
        sequence may be freed too."""
        if seq.preempted:
            seq.preempted, seq.freed = False, True
            return
        self._check_live([seq])
        self.blocks.release_all(seq.block_table)
        seq.block_table = []
        seq.last_logits = None
        seq.freed = True
        del self._live[seq.seq_id]

    def preempt(self, seq: Seq) -> None:
        """Release ``seq``'s blocks but keep the sequence as tokens (with its place in the
        fork tree and its random stream), to be ``restore``d later. Its full blocks stay in
        the prefix cache until the pool needs them, so a restore often recomputes little."""
        self._check_live([seq])
        self.blocks.release_all(seq.block_table)
        seq.block_table, seq.block_hashes, seq.last_logits = [], [], None
        seq.preempted = True
        del self._live[seq.seq_id]

    def restore(self, seq: Seq) -> None:
        """Bring a preempted ``seq`` back: cached blocks of its prefix are reused, the rest
        is recomputed. Raises ``KVCacheFullError`` (the sequence stays preempted) when the
        pool cannot hold it now."""
        if not (isinstance(seq, Seq) and seq.preempted):
            raise ValueError(f"restore: {seq!r} is not a preempted sequence")
        tokens, seq.token_ids = seq.token_ids, []
        try:
            self._prefill([seq], [tokens], f"restoring a preempted sequence of {len(tokens)} tokens")
        except Exception:
            seq.token_ids = tokens
            raise
        seq.preempted = False

    def logits(self, seq: Seq) -> torch.Tensor:
        """Float32 logits ``[vocab]`` after the last token of ``seq`` (a copy)."""
        self.check_steppable([seq])
        return seq.last_logits.to(torch.float32, copy=True)

    def step(self, seqs: Sequence[Seq], sampling: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[int]:
        """One batched decode step: every sequence samples one token, which is appended and
        forwarded. Returns the tokens."""
        return [token for token, _ in self.sample_step(seqs, sampling)]

    def sample_step(
        self, seqs: Sequence[Seq], sampling: SamplingParams | Sequence[SamplingParams] = GREEDY
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """``step``, with each token's log-probabilities where its ``SamplingParams.logprobs``
        asks for them (None elsewhere)."""
        seqs = list(seqs)
        params = per_seq(sampling, len(seqs))
        self._check_live(seqs)
        if not seqs:
            return []
        _check_has_logits(seqs)
        for seq in seqs:
            self._check_room(len(seq) + 1, "step")
        needed = sum(self.runner.blocks_needed(s, 1) for s in seqs)
        self.blocks.require(needed, f"a decode step of {len(seqs)} sequences")
        generators = [self._generator(s, p) for s, p in zip(seqs, params)]
        logits = _stacked_logits(seqs)
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        rows = log_softmax_rows(logits, asking) if asking else None  # before sampling writes the logits
        tokens = sample(logits, params, generators)
        found: list[TokenLogprobs | None] = [None] * len(seqs)
        for row, i in enumerate(asking):
            found[i] = token_logprobs(rows[row], tokens[i], params[i].logprobs)
        self.runner.forward(seqs, [[t] for t in tokens])
        return list(zip(tokens, found))

    def generate_step(
        self,
        seqs: Sequence[Seq],
        sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
        stop: str | None = "\n\n",
        max_tokens: int = 256,
    ) -> list[StepResult]:
        """Each sequence writes one reasoning step, all decoding in one batch: it stops after
        the ``stop`` delimiter (kept in the text), at EOS, or after ``max_tokens`` tokens
        (or at the context length), and its result says which."""
        writer = self.step_writer(stop, max_tokens)
        seqs = list(seqs)
        writer.add(seqs, sampling)
        ended: dict[int, StepResult] = {}
        while len(ended) < len(seqs):
            ended.update((seq.seq_id, result) for seq, result in writer.advance())
        return [ended[seq.seq_id] for seq in seqs]

    def step_writer(self, stop: str | None = "\n\n", max_tokens: int = 256) -> StepWriter:
        """A batch of step-writing sequences that others may join between tokens: see StepWriter."""
        return StepWriter(self, stop, max_tokens)

    def stats(self) -> dict:
        used = self.blocks.num_used
        return {
            "blocks_total": self.blocks.num_blocks,
            "blocks_used": used,
            "blocks_cached": self.blocks.num_cached,
            "blocks_free": self.blocks.num_blocks - used - self.blocks.num_cached,
            "block_size": self.block_size,
            "kv_bytes_used": used * self.block_bytes,
            "kv_bytes_total": self.blocks.num_blocks * self.block_bytes,
            "kv_bytes_per_token": self.block_bytes // self.block_size,
            "sequences": len(self._live),
            "tokens_held": self._tokens_held(),
            "tokens_forwarded": self.tokens_forwarded,
        }

    def _tokens_held(self) -> int:
        """Tokens stored in the used blocks, each shared block counted once: U, the unique tokens
        of the search trees (a decode step moves W + U * kappa bytes, see kv_cache.bytes_per_token)."""
        fill: dict[int, int] = {}
        bs = self.block_size
        for seq in self._live.values():
            for i, block in enumerate(seq.block_table):
                fill[block] = max(fill.get(block, 0), min(bs, len(seq) - i * bs))
        return sum(fill.values())

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, token_ids: Sequence[int], what: str) -> list[int]:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.flatten().tolist()
        tokens = [int(t) for t in token_ids]
        if not tokens:
            raise ValueError(f"{what}: token_ids is empty")
        vocab = self.config.vocab_size
        for pos, t in enumerate(tokens):
            if not 0 <= t < vocab:
                raise InvalidTokenError(f"{what}: token id {t} at position {pos} is outside the vocabulary [0, {vocab})")
        return tokens

    def _check_room(self, length: int, what: str) -> None:
        if length > self.max_model_len:
            raise ContextLengthError(
                f"{what}: the sequence would hold {length} tokens, over the context length {self.max_model_len}"
            )

    def _check_live(self, seqs: list[Seq]) -> None:
        seen = set()
        for seq in seqs:
            if not isinstance(seq, Seq):
                raise TypeError(f"expected a Seq, got {type(seq).__name__}")
            if seq.freed:
                raise ValueError(f"{seq!r} was freed")
            if seq.preempted:
                raise ValueError(f"{seq!r} is preempted: restore it first")
            if self._live.get(seq.seq_id) is not seq:
                raise ValueError(f"{seq!r} does not belong to this engine")
            if seq.seq_id in seen:
                raise ValueError(f"{seq!r} appears twice in one batch")
            seen.add(seq.seq_id)

    def check_steppable(self, seqs: Sequence[Seq]) -> None:
        """Raise unless every one of ``seqs`` is a live sequence of this engine (not freed, not
        preempted, once in the batch) with next-token logits: what ``step`` needs."""
        seqs = list(seqs)
        self._check_live(seqs)
        _check_has_logits(seqs)

    # ------------------------------------------------------------------ helpers
    def _prefill(self, seqs: list[Seq], token_lists: list[list[int]], what: str) -> None:
        """Give the empty ``seqs`` the blocks of their tokens, in one forward: cached full
        blocks of each prefix are taken as they are, the rest is forwarded. Checks capacity
        before any change."""
        # Matching stops one token short: the block holding the last token is always
        # recomputed, so the logits after it exist.
        matches = [self.blocks.match_prefix(tokens[:-1]) for tokens in token_lists]
        revived = {b for blocks, _ in matches for b in blocks if self.blocks.ref_count[b] == 0}  # leave the LRU
        new_blocks = sum(-(-len(t) // self.block_size) - len(blocks) for t, (blocks, _) in zip(token_lists, matches))
        cached = sum(len(blocks) for blocks, _ in matches) * self.block_size
        self.blocks.require(new_blocks + len(revived), f"{what} ({cached} cached)")
        for seq, tokens, (blocks, hashes) in zip(seqs, token_lists, matches):
            for b in blocks:
                self.blocks.retain(b)
            seq.cached_tokens = len(blocks) * self.block_size
            seq.token_ids, seq.block_table, seq.block_hashes = tokens[: seq.cached_tokens], list(blocks), hashes
            self._live[seq.seq_id] = seq
        self.runner.forward(seqs, [t[s.cached_tokens :] for s, t in zip(seqs, token_lists)], seqs[0].wants_logits)

    def _generator(self, seq: Seq, params: SamplingParams) -> torch.Generator | None:
        if params.greedy:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator().manual_seed(derive_seed(params.seed, seq.lineage))
        return seq.generator


def _check_has_logits(seqs: Sequence[Seq]) -> None:
    for seq in seqs:
        if seq.last_logits is None:
            raise ValueError(f"{seq!r} has no next-token logits: its last tokens were written with logits=False")


def _stacked_logits(seqs: Sequence[Seq]) -> torch.Tensor:
    """The sequences' logits rows as one ``[B, vocab]`` tensor: a view, with no copy, when they
    are consecutive rows of one forward's logits in order (a decode batch stepping again);
    otherwise stacked (a B x vocab copy: about 4 ms of a 95 ms step at batch 192 on two cores)."""
    rows = [s.last_logits for s in seqs]
    first, vocab = rows[0], rows[0].shape[0]
    # Consecutive addresses, the last row in the first's storage: every row lies in it.
    if (first.is_contiguous() and rows[-1].untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            and all(r.data_ptr() == first.data_ptr() + i * first.nbytes for i, r in enumerate(rows))):
        return first.as_strided((len(rows), vocab), (vocab, 1))
    return torch.stack(rows)
