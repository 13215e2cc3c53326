"""The engine API: sequences on one paged, forkable KV cache.

    engine = Engine("smollm2-135m")
    seq = engine.add(engine.tokenizer.encode(prompt))     # prefill, reusing cached blocks
    beams = engine.fork(seq, 4)                            # share every block, copy-on-write
    steps = engine.generate_step(beams, SamplingParams(temperature=0.8, seed=1))
    engine.free(seq)

Every public method validates its input before it changes anything: a bad call raises a
clear error and leaves the engine as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ttsearch import ops
from ttsearch.engine.block_manager import BlockManager
from ttsearch.engine.kv_cache import allocate_kv_cache, bytes_per_token
from ttsearch.engine.sampler import GREEDY, SamplingParams, derive_seed, sample
from ttsearch.engine.sequence import Seq
from ttsearch.errors import ContextLengthError, InvalidTokenError, UnsupportedArchitectureError
from ttsearch.models.llama import ForwardBatch, LlamaModel
from ttsearch.models.loader import load_checkpoint

DEFAULT_KV_CACHE_BYTES = 1 << 30
MIN_GROUP = 2  # sequences that must share a prefix before decode reads it once for all


@dataclass
class StepResult:
    """One reasoning step written by one sequence."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (delimiter written, kept), "eos" (the answer ended), "length" (cut)


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None:
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast_bf16 else torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype={dtype}: expected torch.float32 or torch.bfloat16")
    return dtype


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
    ):
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not (isinstance(kv_cache_bytes, int) and kv_cache_bytes > 0):
            raise ValueError(f"kv_cache_bytes must be a positive int, got {kv_cache_bytes!r}")
        if max_model_len is not None and not (isinstance(max_model_len, int) and max_model_len >= 1):
            raise ValueError(f"max_model_len must be a positive int, got {max_model_len!r}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        checkpoint = load_checkpoint(str(model), progress=progress)
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
        self.blocks = BlockManager(self.kv_cache.shape[2], block_size)
        self.block_bytes = block_size * bytes_per_token(self.config, self.dtype)
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._live: dict[int, Seq] = {}
        self.tokens_forwarded = 0  # every token a forward has written, all sequences

    # ------------------------------------------------------------------ public API
    def add(self, token_ids: Sequence[int], logits: bool = True) -> Seq:
        """A new sequence holding ``token_ids``. Full blocks already cached for the same
        prefix are reused; only the rest is forwarded. ``logits=False`` skips the
        next-token logits (a verifier's sequence never samples)."""
        tokens = self._check_tokens(token_ids, "add")
        self._check_room(len(tokens), "add")
        # A prompt that is all cached still needs the logits after its last token: matching
        # stops one token short, so the block holding the last token is always recomputed.
        blocks, hashes = self.blocks.match_prefix(tokens[:-1])
        cached = len(blocks) * self.block_size
        revived = sum(1 for b in blocks if self.blocks.ref_count[b] == 0)  # leave the LRU
        new_blocks = -(-len(tokens) // self.block_size) - len(blocks)
        self.blocks.require(new_blocks + revived, f"a prompt of {len(tokens)} tokens ({cached} cached)")
        for b in blocks:
            self.blocks.retain(b)
        seq = Seq(token_ids=tokens[:cached], block_table=list(blocks), block_hashes=hashes)
        self._live[seq.seq_id] = seq
        self._forward([seq], [tokens[cached:]], logits)
        return seq

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
        needed = sum(self._blocks_needed(s, len(t)) for s, t in zip(seqs, lists))
        self.blocks.require(needed, f"appending to {len(seqs)} sequences")
        hidden = self._forward(seqs, lists, logits)
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
            )
            for i in range(k)
        ]
        for block in seq.block_table:
            self.blocks.retain(block, k)
        seq.forks += 1
        for child in children:
            self._live[child.seq_id] = child
        return children

    def free(self, seq: Seq) -> None:
        """Release ``seq``'s blocks now; full ones stay cached for prefix reuse."""
        self._check_live([seq])
        self.blocks.release_all(seq.block_table)
        seq.block_table = []
        seq.last_logits = None
        seq.freed = True
        del self._live[seq.seq_id]

    def logits(self, seq: Seq) -> torch.Tensor:
        """Float32 logits ``[vocab]`` after the last token of ``seq``."""
        self._check_live([seq])
        self._check_has_logits([seq])
        return seq.last_logits.clone()

    def step(self, seqs: Sequence[Seq], sampling: SamplingParams | Sequence[SamplingParams] = GREEDY) -> list[int]:
        """One batched decode step: every sequence samples one token, which is appended and
        forwarded. Returns the tokens."""
        seqs = list(seqs)
        params = self._per_seq(sampling, len(seqs))
        self._check_live(seqs)
        if not seqs:
            return []
        self._check_has_logits(seqs)
        for seq in seqs:
            self._check_room(len(seq) + 1, "step")
        self.blocks.require(sum(self._blocks_needed(s, 1) for s in seqs), f"a decode step of {len(seqs)} sequences")
        generators = [self._generator(s, p) for s, p in zip(seqs, params)]
        tokens = sample(torch.stack([s.last_logits for s in seqs]), params, generators)
        self._forward(seqs, [[t] for t in tokens])
        return tokens

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
        """Tokens stored in the used blocks, each shared block counted once: U in DESIGN.md."""
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
            if self._live.get(seq.seq_id) is not seq:
                raise ValueError(f"{seq!r} does not belong to this engine")
            if seq.seq_id in seen:
                raise ValueError(f"{seq!r} appears twice in one batch")
            seen.add(seq.seq_id)

    @staticmethod
    def _check_has_logits(seqs: list[Seq]) -> None:
        for seq in seqs:
            if seq.last_logits is None:
                raise ValueError(f"{seq!r} has no next-token logits: its last tokens were written with logits=False")

    @staticmethod
    def _per_seq(sampling, n: int) -> list[SamplingParams]:
        if isinstance(sampling, SamplingParams):
            return [sampling] * n
        params = list(sampling)
        if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"sampling: expected one SamplingParams or a list of {n}, got {sampling!r}")
        return params

    # ------------------------------------------------------------------ cache writes
    def _blocks_needed(self, seq: Seq, n: int) -> int:
        """Blocks that writing ``n`` more tokens to ``seq`` takes from the pool."""
        grow = -(-(len(seq) + n) // self.block_size) - len(seq.block_table)
        return grow + int(self._tail_is_shared(seq))

    def _tail_is_shared(self, seq: Seq) -> bool:
        return len(seq) % self.block_size != 0 and self.blocks.ref_count[seq.block_table[-1]] > 1

    def _reserve(self, seq: Seq, n: int, copies: list[tuple[int, int]]) -> list[int]:
        """Make ``seq``'s next ``n`` slots writable: copy a shared partial tail (queued in
        ``copies``) and allocate new blocks. Returns the slots."""
        if self._tail_is_shared(seq):
            shared = seq.block_table[-1]
            private = self.blocks.allocate()
            copies.append((shared, private))
            self.blocks.release(shared)
            seq.block_table[-1] = private
        while len(seq.block_table) * self.block_size < len(seq) + n:
            seq.block_table.append(self.blocks.allocate())
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(len(seq), len(seq) + n)]

    def _register_full_blocks(self, seq: Seq) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), len(seq) // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(self.blocks.register(seq.block_table[i], parent, tokens))

    def _forward(self, seqs: list[Seq], new_tokens: list[list[int]], logits: bool = True) -> torch.Tensor:
        """Write ``new_tokens[i]`` to ``seqs[i]`` in one batched forward (capacity already
        checked), keep each sequence's next-token logits, return the new tokens' hidden states."""
        copies: list[tuple[int, int]] = []
        slots, positions, input_ids, last_rows, q_starts = [], [], [], [], [0]
        for seq, tokens in zip(seqs, new_tokens):
            slots += self._reserve(seq, len(tokens), copies)
            positions += range(len(seq), len(seq) + len(tokens))
            input_ids += tokens
            q_starts.append(len(input_ids))
            last_rows.append(len(input_ids) - 1)
        if copies:
            src, dst = zip(*copies)
            ops.copy_blocks(self.kv_cache, self._int_tensor(src, torch.int64), self._int_tensor(dst, torch.int64))
        for seq, tokens in zip(seqs, new_tokens):
            seq.token_ids += tokens
        width = max(len(s.block_table) for s in seqs)
        decode = all(len(t) == 1 for t in new_tokens)
        batch = ForwardBatch(
            positions=self._int_tensor(positions, torch.int64),
            slot_mapping=self._int_tensor(slots, torch.int64),
            block_tables=self._int_tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32),
            context_lens=self._int_tensor([len(s) for s in seqs], torch.int32),
            query_start_loc=None if decode else self._int_tensor(q_starts, torch.int32),
            last_rows=self._int_tensor(last_rows, torch.int64),
        )
        if decode:
            self._add_shared_prefixes(batch, seqs)
        hidden = self.model.forward(self._int_tensor(input_ids, torch.int64), batch, self.kv_cache)
        rows = self.model.compute_logits(hidden[batch.last_rows]) if logits else [None] * len(seqs)
        self.tokens_forwarded += len(input_ids)
        for seq, row in zip(seqs, rows):
            seq.last_logits = row
            self._register_full_blocks(seq)
        return hidden

    def _add_shared_prefixes(self, batch: ForwardBatch, seqs: list[Seq]) -> None:
        """Find sequences whose block tables start with the same blocks (the beams of one
        problem share its prompt and their common steps), so decode attention reads each
        shared prefix once per group. Groups are keyed by the first block; a group's prefix
        is the longest run of leading blocks all its members share, full blocks only."""
        by_first: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            if len(seq) > self.block_size:
                by_first.setdefault(seq.block_table[0], []).append(i)
        prefixes, members = [], []
        for rows in by_first.values():
            if len(rows) < MIN_GROUP:
                continue
            first = seqs[rows[0]].block_table
            shared = min((len(seqs[i]) - 1) // self.block_size for i in rows)
            for i in rows[1:]:
                table = seqs[i].block_table
                n = 0
                while n < shared and table[n] == first[n]:
                    n += 1
                shared = n
            if shared:
                prefixes.append(first[:shared])
                members.append(rows)
        if not prefixes:
            return
        width = max(len(p) for p in prefixes)
        group = [-1] * len(seqs)
        for g, rows in enumerate(members):
            for i in rows:
                group[i] = g
        batch.prefix_tables = self._int_tensor([p + [0] * (width - len(p)) for p in prefixes], torch.int32)
        batch.prefix_lens = self._int_tensor([len(p) * self.block_size for p in prefixes], torch.int32)
        batch.seq_group = self._int_tensor(group, torch.int32)

    def _int_tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _generator(self, seq: Seq, params: SamplingParams) -> torch.Generator | None:
        if params.greedy:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator().manual_seed(derive_seed(params.seed, seq.lineage))
        return seq.generator


class StepWriter:
    """Sequences writing one reasoning step each, decoded together a token at a time.

    ``add`` starts a step for more sequences at any point; ``advance`` decodes one token for
    every sequence still writing and returns those whose step just ended, with its result:
    after the ``stop`` delimiter (kept in the text), at EOS, after ``max_tokens`` tokens, or at
    the context length. A scheduler that starts each next step as soon as the last one is
    scored keeps the batch full while slower steps are still being written.
    """

    def __init__(self, engine: Engine, stop: str | None, max_tokens: int):
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.engine = engine
        self.stop = stop
        self.max_tokens = max_tokens
        self._window = len(stop) + 2 if stop else 0  # tokens enough to spell the delimiter
        self._writing: dict[int, tuple[Seq, SamplingParams, list[int]]] = {}
        self._ended: list[tuple[Seq, StepResult]] = []

    def __len__(self) -> int:
        """Sequences still writing their step."""
        return len(self._writing)

    def add(self, seqs: Sequence[Seq], sampling: SamplingParams | Sequence[SamplingParams] = GREEDY) -> None:
        seqs = list(seqs)
        params = self.engine._per_seq(sampling, len(seqs))
        self.engine._check_live(seqs)
        self.engine._check_has_logits(seqs)
        for seq in seqs:
            if seq.seq_id in self._writing:
                raise ValueError(f"{seq!r} is already writing a step")
        for seq, p in zip(seqs, params):
            if len(seq) >= self.engine.max_model_len:
                self._ended.append((seq, StepResult([], "", "length")))
            else:
                self._writing[seq.seq_id] = (seq, p, [])

    def advance(self) -> list[tuple[Seq, StepResult]]:
        ended, self._ended = self._ended, []
        if not self._writing:
            return ended
        entries = list(self._writing.values())
        tokens = self.engine.step([seq for seq, _, _ in entries], [p for _, p, _ in entries])
        for (seq, _, written), token in zip(entries, tokens):
            written.append(token)
            reason = self._reason(seq, written)
            if reason is not None:
                del self._writing[seq.seq_id]
                text = self.engine.tokenizer.decode(written, skip_special_tokens=True)
                ended.append((seq, StepResult(written, text, reason)))
        return ended

    def _reason(self, seq: Seq, written: list[int]) -> str | None:
        if written[-1] in self.engine.eos_token_ids:
            return "eos"
        if self.stop and self.stop in self.engine.tokenizer.decode(written[-self._window :]):
            return "stop"
        if len(written) >= self.max_tokens or len(seq) >= self.engine.max_model_len:
            return "length"
        return None
