"""The policy and its verifier, loaded in one place for ``search.run``, a Ray worker and ``Searcher``."""

from __future__ import annotations


def load_models(model: str = "smollm2-135m", verifier="arithmetic", *, verifier_options: dict | None = None,
                dtype: str | None = None, weights: str = "auto", kv_cache_bytes: int | None = None,
                policy=None, progress: bool = False, prefix_caching: bool = True, aggregation: str = "last"):
    """``(policy, verifier)``: the policy Engine (``policy`` if given, else ``model`` loaded with a
    KV pool of ``kv_cache_bytes``) and the verifier (``verifier`` if it is a Verifier, else the
    spec loaded by ``load_verifier`` with ``verifier_options``, aggregating by ``aggregation``)."""
    if policy is None:
        from ttsearch.engine.engine import DEFAULT_KV_CACHE_BYTES, Engine

        policy = Engine(model, dtype=dtype, kv_cache_bytes=kv_cache_bytes or DEFAULT_KV_CACHE_BYTES,
                        progress=progress, prefix_caching=prefix_caching, weights=weights)
    from ttsearch.verifiers import Verifier, load_verifier

    if not isinstance(verifier, Verifier):
        verifier = load_verifier(verifier, policy_engine=policy, aggregation=aggregation, **(verifier_options or {}))
    return policy, verifier
