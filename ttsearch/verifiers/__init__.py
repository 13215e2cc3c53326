"""Verifiers that score reasoning steps on the engine's own tree: model-based PRMs in their
published formats, self-verification, and an arithmetic checker. ``load_verifier`` builds one
from a spec."""

from ttsearch.verifiers.arithmetic import ArithmeticChecker
from ttsearch.verifiers.base import Verifier, VerifierState
from ttsearch.verifiers.load import FAMILIES, detect_family, load_verifier, register_verifier
from ttsearch.verifiers.model import ModelPRM, Readout
from ttsearch.verifiers.self_verify import SelfVerifier

__all__ = [
    "Verifier",
    "VerifierState",
    "load_verifier",
    "register_verifier",
    "detect_family",
    "FAMILIES",
    "ModelPRM",
    "Readout",
    "SelfVerifier",
    "ArithmeticChecker",
]
