"""The search strategies, one problem each: which paths live, fork, finish or die, and the
registry that names them.

A strategy never generates or scores by itself: the scheduler (``scheduler.py``) makes every
beam in ``live`` of every problem write one step in one decode batch (each as ``write_for``
says), scores the steps in one verifier call, and hands the beams whose step ended to the
strategy's ``advance``, which decides what lives next. Pruned beams are freed at once,
policy sequence and verifier state alike. A strategy also says what it needs: the settings it
refuses (``check``), the beams it starts with and the most it holds (``first_beams``,
``peak_beams``), and what its record holds beyond every search's (``record_fields``).

The rules are search-and-learn's (``src/sal/search/{best_of_n,beam_search,dvts}.py``), so a
run here is comparable with its numbers; ``SearchConfig``'s options of ours change them.
Particle filtering and REBASE follow their papers on the same protocol; compute_optimal
picks one of them per problem from a fitted table.
"""

from __future__ import annotations

from ttsearch.search.strategies.base import Beam, Lookahead, Strategy, Write
from ttsearch.search.strategies.beam_search import BeamSearch
from ttsearch.search.strategies.best_of_n import BestOfN
from ttsearch.search.strategies.compute_optimal import ComputeOptimal
from ttsearch.search.strategies.dvts import DVTS
from ttsearch.search.strategies.particle_filter import ParticleFilter, particle_weights, resample_counts
from ttsearch.search.strategies.rebase import Rebase, share_widths

#: the strategies by name; ``register_strategy`` adds yours
SEARCHES: dict[str, type[Strategy]] = {"best_of_n": BestOfN, "beam_search": BeamSearch, "dvts": DVTS,
                                       "particle_filter": ParticleFilter, "rebase": Rebase,
                                       "compute_optimal": ComputeOptimal}
#: the built-in strategies' names
STRATEGIES = tuple(SEARCHES)


def register_strategy(name: str, cls: type[Strategy]) -> None:
    """Make ``strategy=name`` (``--strategy name``) run ``cls``, a subclass of ``Strategy``."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"register_strategy: {name!r} is not a valid strategy name")
    if name in STRATEGIES:
        raise ValueError(f"register_strategy: {name!r} is a built-in strategy")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"register_strategy({name!r}): {cls!r} is not a subclass of ttsearch.Strategy")
    SEARCHES[name] = cls


__all__ = ["Beam", "Write", "Strategy", "Lookahead", "BestOfN", "BeamSearch", "DVTS", "ParticleFilter", "Rebase",
           "ComputeOptimal", "SEARCHES", "STRATEGIES", "register_strategy", "particle_weights", "resample_counts",
           "share_widths"]
