"""Model-based PRMs on the engine's tree: each beam's verifier state owns a sequence on the PRM's
engine (a second engine, or the policy's own), forked and freed with the beam. Scoring a step
appends only that step's ids in the PRM's format and reads the hidden state at its last one.

The readout is fused (``ops.prm_step_score``): final norm, then only the rows the score needs —
the two candidate rows of the LM head, a 2-class head, or a value head — then the probability
and the running aggregate. Full-vocabulary logits are never formed at a read position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttsearch import ops
from ttsearch.engine.engine import Engine
from ttsearch.verifiers.base import Verifier, VerifierState
from ttsearch.verifiers.formats import StepFormat


@dataclass
class Readout:
    """Hidden states (before the final norm) at read positions -> P(good) and the aggregate."""

    norm_weight: torch.Tensor
    eps: float
    weight: torch.Tensor  # [2, hidden]: softmax, P = row positive_index; [1, hidden]: sigmoid
    bias: torch.Tensor | None = None
    positive_index: int = 0
    mlp: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, bias) of a Linear + ReLU before `weight`

    def __call__(self, hidden, prev_agg, prev_count, aggregation) -> tuple[torch.Tensor, torch.Tensor]:
        norm_weight = self.norm_weight
        if self.mlp is not None:
            hidden = F.relu(F.linear(ops.rms_norm(hidden, norm_weight, self.eps).float(), *self.mlp))
            norm_weight = None  # already applied
        device = hidden.device
        scores, aggregates = ops.prm_step_score(
            hidden,
            norm_weight,
            self.eps,
            self.weight,
            self.bias,
            self.positive_index,
            prev_agg.to(device),
            prev_count.to(device),
            aggregation,
        )
        return scores.cpu(), aggregates.cpu()

    @classmethod
    def lm_rows(cls, engine: Engine, good: int, bad: int) -> Readout:
        """P(good) against P(bad) from the two tokens' rows of the LM head."""
        model = engine.model
        weight = model.lm_head[[good, bad]].float()
        return cls(model.final_norm, engine.config.rms_norm_eps, weight)

    @classmethod
    def from_head(cls, engine: Engine, kind: str, tensors: dict[str, torch.Tensor]) -> Readout:
        """A PRM head ("classifier" or "value", tensors as loader.load_head_weights names them)."""
        model, eps = engine.model, engine.config.rms_norm_eps
        t = {name: tensor.to(engine.device) for name, tensor in tensors.items()}
        if kind == "classifier":  # index 1 = positive
            mlp = (t["score.0.weight"], t["score.0.bias"])
            return cls(model.final_norm, eps, t["score.2.weight"], t["score.2.bias"], 1, mlp)
        return cls(model.final_norm, eps, t["v_head.summary.weight"], t["v_head.summary.bias"])


class ModelPRM(Verifier):
    """A PRM read from ``engine``: ``format`` writes the steps, ``readout`` scores them."""

    def __init__(self, engine: Engine, step_format: StepFormat, readout: Readout, aggregation: str = "last"):
        super().__init__(aggregation)
        self.engine = engine
        self.format = step_format
        self.readout = readout

    def new(self, question, policy_seq=None):
        state = super().new(question, policy_seq)
        ids, state.context = self.format.prefix(question)
        state.seq = self.engine.add(ids, logits=False)
        return state

    def _fork_seqs(self, state, k):
        return self.engine.fork(state.seq, k)

    def _free_seq(self, state):
        self.engine.free(state.seq)

    def blocks_to_start(self, question):
        ids, _ = self.format.prefix(question)
        cached, _ = self.engine.blocks.match_prefix(ids[:-1])
        return -(-len(ids) // self.engine.block_size) - len(cached)

    def blocks_to_score(self, states):
        return 2 * states  # a state's first new block, and its copied tail when forked

    def _score(self, states, steps, policy_seqs, prev_agg, prev_count):
        written = self.format.steps([s.context for s in states], steps)
        hidden = self.engine.append_batch(
            [s.seq for s in states], [ids for ids, _ in written], hidden_at=[[-1]] * len(states), logits=False
        )
        self.last_tokens = [len(ids) for ids, _ in written]
        for state, (_, context) in zip(states, written):
            state.context = context
        return self.readout(hidden, prev_agg, prev_count, self.aggregation)

    def resume(self, question, paths, scores):
        written = [self._written(question, steps) for steps in paths]
        seqs = self.engine.add_batch([ids for ids, _, _ in written], logits=False)  # through the prefix cache
        states = []
        for seq, (_, _, context), steps, step_scores in zip(seqs, written, paths, scores):
            states.append(VerifierState(list(step_scores), self.aggregate(step_scores), seq, context, question=question,
                                        steps=tuple(steps), owner=self.verifier_id))
        return states

    def token_ids(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The whole text as incremental scoring writes it, and the index of each step's read
        position: what a full re-scoring forwards."""
        ids, reads, _ = self._written(question, steps)
        return ids, reads

    def _written(self, question: str, steps: list[str]) -> tuple[list[int], list[int], object]:
        """(ids, each step's read position, the format's context after the last step)."""
        ids, context = self.format.prefix(question)
        ids, reads = list(ids), []
        for step in steps:
            (step_ids, context), = self.format.steps([context], [step])
            ids += step_ids
            reads.append(len(ids) - 1)
        return ids, reads, context
