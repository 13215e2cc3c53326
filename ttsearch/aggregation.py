"""How a path's step scores combine into one: the running aggregate every verifier keeps.

``last`` (the latest step's score), ``min``, ``prod`` and ``mean`` over the steps so far. The
verifiers update it here; the ``prm_step_score`` op updates it inside its fused readout, its
reference body with ``update_aggregate`` and every fast implementation the same way.
"""

from __future__ import annotations

import torch

#: the ways a path's step scores combine, by name
AGGREGATIONS = ("last", "min", "prod", "mean")


def update_aggregate(prev_agg: torch.Tensor, prev_count: torch.Tensor, scores: torch.Tensor, how: str) -> torch.Tensor:
    """A beam's running aggregate after one more step score; count 0 starts from the score."""
    first = prev_count == 0
    if how == "last":
        return scores.clone()  # outputs never alias each other
    if how == "min":
        return torch.where(first, scores, torch.minimum(prev_agg, scores))
    if how == "prod":
        return torch.where(first, scores, prev_agg * scores)
    count = prev_count.float()
    return torch.where(first, scores, (prev_agg * count + scores) / (count + 1))
