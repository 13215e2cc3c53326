"""A text already written in a PRM's format, read back into the question and the steps that the
verifier scores (``POST /pooling``, vLLM's reward-model shape).

vLLM's STEP pooler reads a score at every step tag of a text the client wrote in the PRM's
format. Our verifiers write their format themselves, from a question and its steps, so the text
is cut at the format's tag (``StepFormat.tag``: Math-Shepherd's ``ки``, Qwen2.5-Math-PRM's
``<extra_0>``) into a question and steps, and the verifier's own tokens for them must be the
text's tokens, to its last tag: then every score is read where vLLM would read it, from the
same tokens. A text the verifier would write otherwise (no space before a tag, no whitespace
between a tag and the next step, ...) is refused with the place where the two part.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttsearch.verifiers.base import Verifier


@dataclass
class TaggedText:
    question: str
    steps: list[str]  # as ``Verifier.score`` and ``/v1/score_steps`` take them
    tokens: int  # what the verifier reads for them: the text's tokens to its last tag


def step_tag(verifier: Verifier) -> str:
    """The tag that ends each step in the verifier's text; a ValueError for a verifier whose
    text marks no steps."""
    tag = getattr(getattr(verifier, "format", None), "tag", None)
    if tag is None:
        what = type(getattr(verifier, "format", None) or verifier).__name__
        raise ValueError(f"the server's verifier ({type(verifier).__name__}, {what}) marks no step with a tag in "
                         "its text, so none can be found in a posted text; send the steps to /v1/score_steps")
    return tag


def read_text(verifier: Verifier, text: str, add_special_tokens: bool = True) -> TaggedText:
    """A whole text in the verifier's format (the question's prompt, then the steps, each
    ending at the tag), tokenized with or without the tokenizer's special tokens."""
    step_tag(verifier)
    question, solution = verifier.format.split_text(text)
    return _read(verifier, question, solution, add_special_tokens)


def read_solution(verifier: Verifier, question: str, solution: str) -> TaggedText:
    """A question and the text of its steps, each ending at the tag (a chat's last user turn
    and the assistant's reply), written in the verifier's format."""
    tag = step_tag(verifier)
    if tag not in solution:
        raise ValueError(f"no step tag {tag!r} in it: each step must end with the tag")
    return _read(verifier, question, solution, True)


def _read(verifier, question: str, solution: str, add_special_tokens: bool) -> TaggedText:
    form, tokenizer = verifier.format, verifier.format.tokenizer
    if not question.strip():
        raise ValueError("the question is empty")
    steps, covered = form.split_steps(solution)
    if not steps:
        raise ValueError(f"no step tag {form.tag!r} in it: each step must end with the tag")
    text = form.join(question, solution[:covered])
    expected = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    room = verifier.engine.max_model_len
    if len(expected) > room:
        raise ValueError(f"{len(expected)} tokens to its last tag, over the verifier's context length {room}")
    written, reads = verifier.token_ids(question, steps)
    if written != expected:
        if written[1:] == expected or written == expected[1:]:
            raise ValueError(f"add_special_tokens={add_special_tokens}: the verifier writes its text "
                             f"{'with' if len(written) > len(expected) else 'without'} the tokenizer's special tokens")
        at = next((i for i, (a, b) in enumerate(zip(written, expected)) if a != b), min(len(written), len(expected)))
        step = next((k for k, read in enumerate(reads) if read >= at), len(steps) - 1)
        wrote = tokenizer.decode(written[max(at - 3, 0) : at + 3])
        found = tokenizer.decode(expected[max(at - 3, 0) : at + 3])
        raise ValueError(f"step {step + 1} ({steps[step][:40]!r}), or the text before it, is not written as the "
                         f"verifier writes it ({form.layout}): the verifier reads {wrote!r} where the text has "
                         f"{found!r}")
    return TaggedText(question, steps, len(written))
