"""The scheduler: every live beam of every problem in flight decodes in one batch, a token at a time.

When a problem's beams have ended their step (or, for best-of-N, any one of them), the steps
are scored (one verifier call for every problem ready at that token), the problem's strategy
decides what lives next, and its next steps join the batch at once: a problem with short
steps never waits for another's long ones.

The KV pool is shared and can run out. Admission starts a problem only while the pool has
room for its prompt and a block for every live beam; when the next token (or a verifier's
write) still cannot be placed, the newest problems are preempted whole: their blocks are
released, their trees kept as tokens, and they wait to be restored (their prefixes through
the prefix cache, the rest recomputed) before any new problem starts. Each sequence keeps its
random stream through that, so a seeded run writes the same records whatever the pool size.

A plain generation request (``generation.py``) is a job too: its choices decode in the same
batch and may be preempted like a search's beams, but nothing scores them (``scored`` False):
a choice whose step ended is handed back to it as written.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ttsearch.engine.sampler import GREEDY, SamplingParams
from ttsearch.engine.step_writer import StepInProgress, StepResult
from ttsearch.errors import ContextLengthError, KVCacheFullError
from ttsearch.search.strategies import Beam, Strategy


@dataclass(eq=False)
class Job:
    """One problem's search in the scheduler, and the work it has cost so far."""

    problem: object  # anything with ``id`` (ttsearch.eval.datasets.Problem)
    search: Strategy  # or a Generation (unscored)
    sampling: SamplingParams
    started: float = 0.0
    tokens_generated: int = 0
    tokens_verified: int = 0
    peak_blocks: int = 0
    preemptions: int = 0
    order: int = -1  # admission order: the newest is preempted first
    ended: dict[int, tuple[Beam, StepResult]] = field(default_factory=dict)  # beam_id -> its ended, unscored step
    paused: list[StepInProgress] = field(default_factory=list)  # steps in progress while preempted


@dataclass
class SchedulerStats:
    """What the batch did: occupancy is decoded sequences over live beams, per decode step."""

    decode_steps: int = 0
    sequences_decoded: int = 0  # summed over decode steps
    live_beams: int = 0  # beams of running problems, summed over decode steps
    decode_seconds: float = 0.0
    score_seconds: float = 0.0
    preemptions: int = 0
    restores: int = 0

    @property
    def occupancy(self) -> float:
        return self.sequences_decoded / self.live_beams if self.live_beams else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "occupancy": self.occupancy}


class Scheduler:
    def __init__(self, policy, verifier, on_step: Callable[[Job, dict], None] | None = None):
        self.policy = policy
        self.verifier = verifier
        self.on_step = on_step  # sees every scored step: its job and its node of the tree
        self.shared_pool = getattr(verifier, "engine", None) is policy
        self.writer = policy.step_writer()
        self.running: list[Job] = []
        self.waiting: list[Job] = []  # preempted, in admission order: restored before new problems start
        self.stats = SchedulerStats()
        self.generated = 0
        self._writing: dict[int, tuple[Job, Beam]] = {}  # id(policy seq) -> its job and beam
        self._order = itertools.count()

    @property
    def jobs(self) -> list[Job]:
        return self.running + self.waiting

    # ------------------------------------------------------------------ admission
    def blocks_to_start(self, search: Strategy) -> tuple[int, int]:
        """(policy blocks, verifier blocks) that starting ``search`` takes: its prompts."""
        policy = -(-len(search.prompt_ids) // self.policy.block_size)
        verifier = self.verifier.blocks_to_start(search.question) if search.scored else 0
        return (policy + verifier, 0) if self.shared_pool else (policy, verifier)

    def check_fits_alone(self, search: Strategy, problem_id: str) -> None:
        """A problem whose prompt leaves no room in the context, or whose prompt and first
        beams cannot fit even in an empty pool, fails here, before its first token."""
        c = search.config
        if len(search.prompt_ids) >= self.policy.max_model_len:
            raise ContextLengthError(f"problem {problem_id!r}: its prompt is {len(search.prompt_ids)} tokens, with no "
                                     f"room left for a step in the context length {self.policy.max_model_len}")
        beams = search.peak_beams
        policy, verifier = self.blocks_to_start(search)
        scoring = self.verifier.blocks_to_score(beams)
        needs = [(self.policy, policy + beams + (scoring if self.shared_pool else 0), "the policy's",
                  "raise --kv-cache-gib or lower n")]
        if self.verifier.engine is not None and not self.shared_pool:
            needs.append((self.verifier.engine, verifier + scoring, "the verifier's",
                          'give the verifier a larger pool (--verifier-options \'{"kv_cache_bytes": ...}\') or lower n'))
        for engine, needed, what, remedy in needs:
            if needed <= engine.blocks.num_blocks:
                continue
            bs = engine.block_size
            gib = engine.blocks.num_blocks * engine.block_bytes / 2**30
            raise KVCacheFullError(
                f"problem {problem_id!r} cannot fit in {what} KV pool even alone: n={c.n} beams on a "
                f"{len(search.prompt_ids)}-token prompt need at least {needed * bs} tokens ({needed} blocks of {bs}: "
                f"the prompts, and a block per beam for each step written and scored), and each beam may grow to "
                f"{c.max_iterations * c.step_tokens} tokens, but the pool holds {engine.blocks.num_blocks * bs} "
                f"tokens ({gib:.3g} GiB); {remedy}"
            )

    def _watermarks(self, search=None, beams: int = 0) -> tuple[int, int]:
        """(policy blocks, verifier blocks) that the running problems' next tokens and
        scoring take at least, with ``beams`` more beams of ``search``: a block for every live
        beam, and what the verifier writes to score each scored one (to the policy's pool when
        they share it)."""
        scored = beams if search is not None and search.scored else 0
        scored += sum(len(job.search.live) for job in self.running if job.search.scored)
        beams += sum(len(job.search.live) for job in self.running)
        scoring = self.verifier.blocks_to_score(scored)
        return (beams + scoring, 0) if self.shared_pool else (beams, scoring)

    def has_room_for(self, search: Strategy) -> bool:
        policy, verifier = self.blocks_to_start(search)
        policy_mark, verifier_mark = self._watermarks(search, search.first_beams)
        room = self.policy.blocks.num_available >= policy + policy_mark
        if self.verifier.engine is not None and not self.shared_pool:
            room = room and self.verifier.engine.blocks.num_available >= verifier + verifier_mark
        return room

    def add(self, job: Job) -> bool:
        """Start ``job`` if the pool has room for it (and no preempted problem waits); False
        if it must wait."""
        if self.waiting or (self.running and not self.has_room_for(job.search)):
            return False
        try:
            job.search.start()
        except KVCacheFullError:
            if not self.running:
                raise
            return False
        job.order = next(self._order)
        self.running.append(job)
        self._begin_steps(job, job.search.live)
        return True

    # ------------------------------------------------------------------ one token
    def step(self) -> list[Job]:
        """Decode one token for every beam writing; score and advance each job whose beams
        are ready. Returns the jobs whose search is done (no longer held)."""
        self._restore_waiting()
        if not self.running:
            return []
        start = time.perf_counter()
        ended = self._decode()
        self.stats.decode_seconds += time.perf_counter() - start
        for seq, result in ended:
            job, beam = self._writing.pop(id(seq))
            job.ended[beam.beam_id] = (beam, result)
            job.tokens_generated += len(result.token_ids)
            self.generated += len(result.token_ids)
        ready = [job for job in self.running if job.ended and (
            len(job.ended) == len(job.search.live) or not job.search.waits_for_all)]
        if not ready:
            return []
        start = time.perf_counter()
        self._score([job for job in ready if job.search.scored])
        self.stats.score_seconds += time.perf_counter() - start
        ready = [job for job in ready if job in self.running]  # one preempted to make room for scoring waits
        blocks = self.policy.blocks.num_used
        done = []
        for job in ready:
            job.peak_blocks = max(job.peak_blocks, blocks)
            steps = list(job.ended.values())
            job.ended = {}
            writing = {id(b) for b in job.search.live} - {id(b) for b, _ in steps}
            if not job.search.scored:
                job.search.record(steps)
            else:
                job.search.advance([beam for beam, _ in steps])
                reason = None if job.search.done else job.search.agreement()
                if reason is not None:
                    self._stop_early(job, reason)
            if job.search.done:
                self.running.remove(job)
                done.append(job)
            else:
                self._begin_steps(job, [b for b in job.search.live if id(b) not in writing])
        return done

    def _decode(self) -> list[tuple[object, StepResult]]:
        live = sum(len(job.search.live) for job in self.running)
        while True:
            try:
                writing = len(self.writer)
                ended = self.writer.advance()
                break
            except KVCacheFullError as exc:
                self._make_room(exc)
        if writing:
            self.stats.decode_steps += 1
            self.stats.sequences_decoded += writing
            self.stats.live_beams += live
        return ended

    def _score(self, ready: list[Job]) -> None:
        """Score the ended steps of ``ready`` jobs in one verifier call and update their beams
        (a job preempted to make room waits to be restored, unscored)."""
        if not ready:
            return
        while True:
            units = [(job, beam, result) for job in ready for beam, result in job.ended.values()]
            try:
                scores = self.verifier.score([b.vstate for _, b, _ in units], [r.text for _, _, r in units],
                                             policy_seqs=[b.seq for _, b, _ in units])
                break
            except KVCacheFullError as exc:
                self._make_room(exc)
                ready = [job for job in ready if job in self.running]
        tokens = self.verifier.last_tokens or [0] * len(units)
        for (job, beam, result), score, verified in zip(units, scores, tokens):
            job.search.add_step(beam, result.text, len(result.token_ids), score, result.finish_reason)
            job.tokens_verified += verified
            if self.on_step is not None:
                self.on_step(job, job.search.nodes[-1])

    def _begin_steps(self, job: Job, beams: list[Beam]) -> None:
        for beam in beams:
            write = job.search.write_for(beam)
            self._writing[id(beam.seq)] = (job, beam)
            sampling = GREEDY if write.greedy else job.sampling
            self.writer.add([beam.seq], sampling, stop=write.stop, max_tokens=write.max_tokens)

    def cancel(self, job: Job) -> None:
        """Drop ``job`` wherever it is (running or preempted): its steps leave the batch and
        its beams are freed at once."""
        if job in self.running:
            self._take_steps(job)
            self.running.remove(job)
        elif job in self.waiting:
            self.waiting.remove(job)
            job.paused = []
        else:
            return
        job.ended = {}
        job.search.abort()

    def _take_steps(self, job: Job) -> list[StepInProgress]:
        """Take ``job``'s steps in progress out of the decode batch; returns them unfinished."""
        steps = self.writer.remove([b.seq for b in job.search.held()])
        for step in steps:
            del self._writing[id(step.seq)]
        return steps

    def _stop_early(self, job: Job, reason: str) -> None:
        """The problem's answers agree: its steps leave the batch (the tokens they wrote still
        count as work done) and its beams are freed."""
        for step in self._take_steps(job):
            job.tokens_generated += len(step.written)
            self.generated += len(step.written)
        job.search.stop_early(reason)

    # ------------------------------------------------------------------ preemption
    def _make_room(self, exc: KVCacheFullError) -> None:
        """Preempt the newest running job; with one job left there is nothing to take from."""
        if len(self.running) <= 1:
            job = self.running[0] if self.running else None
            if job is None:
                raise exc
            held = sum(len(b.seq) for b in job.search.held())
            engine = self.policy
            gib = engine.blocks.num_blocks * engine.block_bytes / 2**30
            raise KVCacheFullError(
                f"problem {job.problem.id!r} alone outgrew the KV pool: {len(job.search.held())} beams hold "
                f"{held} tokens, the pool {engine.blocks.num_blocks * engine.block_size} "
                f"tokens ({gib:.3g} GiB); raise --kv-cache-gib or lower n or max_tokens ({exc})"
            ) from exc
        self.preempt(max(self.running, key=lambda j: j.order))

    def preempt(self, job: Job) -> None:
        """Release ``job``'s blocks, keep its tree as tokens, and queue it for restoring."""
        beams = job.search.held()
        job.paused = self._take_steps(job)
        for beam in beams:
            self.policy.preempt(beam.seq)
            if beam.vstate is not None:
                self.verifier.preempt(beam.vstate)
        self.running.remove(job)
        self.waiting.append(job)
        self.waiting.sort(key=lambda j: j.order)
        job.preemptions += 1
        self.stats.preemptions += 1

    def _restore_waiting(self) -> None:
        """Restore preempted jobs, oldest first, while the pools have room for them."""
        while self.waiting:
            job = self.waiting[0]
            if self.running and not self._room_to_restore(job):
                return
            if not self._restore(job):
                if not self.running:
                    raise KVCacheFullError(f"problem {job.problem.id!r} cannot be restored even in an empty pool")
                return
            self.waiting.pop(0)
            self.running.append(job)
            self.running.sort(key=lambda j: j.order)
            self.stats.restores += 1

    def _room_to_restore(self, job: Job) -> bool:
        beams = job.search.held()
        policy_mark, verifier_mark = self._watermarks(job.search, len(job.search.live))
        policy = _unique_blocks([b.seq.token_ids for b in beams], self.policy.block_size)
        vseqs = [b.vstate.seq for b in beams if b.vstate is not None and b.vstate.seq is not None]
        verifier = _unique_blocks([s.token_ids for s in vseqs], self.verifier.engine.block_size) if vseqs else 0
        if self.shared_pool:
            return self.policy.blocks.num_available >= policy + verifier + policy_mark
        room = self.policy.blocks.num_available >= policy + policy_mark
        return room and (not vseqs or self.verifier.engine.blocks.num_available >= verifier + verifier_mark)

    def _restore(self, job: Job) -> bool:
        """Recompute ``job``'s sequences (their cached prefixes reused); False, with the job
        preempted as before, if the pool filled up on the way."""
        beams = job.search.held()
        seqs, vstates = [], []
        try:
            for beam in beams:
                self.policy.restore(beam.seq)
                seqs.append(beam.seq)
                if beam.vstate is not None:
                    self.verifier.restore(beam.vstate)
                    vstates.append(beam.vstate)
        except KVCacheFullError:
            for seq in seqs:
                self.policy.preempt(seq)
            for state in vstates:
                self.verifier.preempt(state)
            return False
        for step in job.paused:
            self._writing[id(step.seq)] = next((job, b) for b in beams if b.seq is step.seq)
        self.writer.resume(job.paused)
        job.paused = []
        return True


def _unique_blocks(token_lists: list[list[int]], block_size: int) -> int:
    """Blocks a set of sequences holds with their common full blocks shared: distinct
    full-block prefixes, plus a partial tail each."""
    full = set()
    for tokens in token_lists:
        key = None
        for start in range(0, len(tokens) - block_size + 1, block_size):
            key = hash((key, tuple(tokens[start : start + block_size])))
            full.add(key)
    return len(full) + sum(1 for t in token_lists if len(t) % block_size)
