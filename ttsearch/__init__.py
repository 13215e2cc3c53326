"""ttsearch: test-time-scaling search for small language models on a paged, forkable KV cache."""

__version__ = "0.1.0"

from ttsearch.engine import GREEDY, Engine, SamplingParams, Seq, StepResult

__all__ = ["Engine", "SamplingParams", "GREEDY", "Seq", "StepResult", "__version__"]
