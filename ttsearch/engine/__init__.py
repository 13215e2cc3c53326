from ttsearch.engine.engine import Engine, StepResult
from ttsearch.engine.sampler import GREEDY, SamplingParams
from ttsearch.engine.sequence import Seq

__all__ = ["Engine", "StepResult", "SamplingParams", "GREEDY", "Seq"]
