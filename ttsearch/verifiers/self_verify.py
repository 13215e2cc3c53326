"""Self-verification: the policy judges its own step on its own cache.

Each beam that wrote a step is forked, the fork gets a short verification suffix (in the
policy's chat format: the assistant turn closes, a user turn asks, an assistant turn opens),
P(yes) against P(no) is read at the suffix's last token from the two LM-head rows, and the
fork is freed. No second model, and nothing but the suffix is forwarded.
"""

from __future__ import annotations

from ttsearch.engine.engine import Engine
from ttsearch.errors import ModelLoadError
from ttsearch.verifiers.base import Verifier
from ttsearch.verifiers.formats import SENTINEL, render_chat, sentinel_at, single_token
from ttsearch.verifiers.model import Readout

ASK = "Is this step correct? Answer yes or no."


class SelfVerifier(Verifier):
    """Scores the step each of ``policy_seqs`` has just written (the step's text is already in
    the beam, so ``steps`` is not encoded again). ``ask`` is the user turn's question;
    ``suffix`` replaces the whole chat-formatted suffix verbatim (for a policy without a chat
    template); ``candidates`` are the answers read, each one token."""

    needs_policy = True

    def __init__(
        self,
        engine: Engine,
        aggregation: str = "last",
        ask: str = ASK,
        candidates: tuple[str, str] = ("yes", "no"),
        suffix: str | None = None,
    ):
        super().__init__(aggregation)
        tokenizer = engine.tokenizer
        if suffix is None:
            if not tokenizer.chat_template:
                raise ModelLoadError("self-verification: the policy's tokenizer has no chat template; pass suffix=")
            turns = [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": SENTINEL},
                {"role": "user", "content": ask},
            ]
            rendered = render_chat(tokenizer, turns, add_generation_prompt=True)
            suffix = rendered[sentinel_at(rendered, "self-verification") + len(SENTINEL) :]
        self.suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
        if not self.suffix_ids:
            raise ValueError("self-verification: the verification suffix is empty")
        good, bad = (single_token(tokenizer, c, "self-verification answer") for c in candidates)
        self.engine = engine
        self.readout = Readout.lm_rows(engine, good, bad)

    def blocks_to_score(self, states):
        # each beam's fork: its copied tail and the verification suffix (freed after scoring)
        return states * (-(-len(self.suffix_ids) // self.engine.block_size) + 1)

    def _score(self, states, steps, policy_seqs, prev_agg, prev_count):
        if policy_seqs is None:
            raise ValueError("self-verification scores the policy's beams: pass policy_seqs")
        # the forks' writes must fit before the first fork: a fork changes its parent's lineage
        needed = self.engine.fork_blocks_needed(policy_seqs, len(self.suffix_ids))
        self.engine.blocks.require(needed, f"self-verifying {len(policy_seqs)} steps")
        forks = []
        try:
            for seq in policy_seqs:
                forks += self.engine.fork(seq, 1)
            hidden = self.engine.append_batch(
                forks, [self.suffix_ids] * len(forks), hidden_at=[[-1]] * len(forks), logits=False
            )
        finally:
            for fork in forks:
                self.engine.free(fork)
        self.last_tokens = [len(self.suffix_ids)] * len(states)
        return self.readout(hidden, prev_agg, prev_count, self.aggregation)
