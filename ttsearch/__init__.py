"""ttsearch: test-time-scaling search for small language models on a paged, forkable KV cache."""

__version__ = "0.1.0"

from ttsearch.engine import GREEDY, Engine, SamplingParams, Seq, StepResult
from ttsearch.api import Completion, SearchResult, Searcher, StepEvent
from ttsearch.search.config import SearchConfig
from ttsearch.search.strategies import Beam, Strategy, register_strategy
from ttsearch.verifiers import Verifier, register_verifier

__all__ = ["Engine", "SamplingParams", "GREEDY", "Seq", "StepResult", "Searcher", "SearchResult", "Completion",
           "StepEvent", "SearchConfig", "Strategy", "Beam", "register_strategy", "Verifier", "register_verifier",
           "__version__"]
