"""The published input formats of the model-based PRMs, written step by step.

A format turns a question into the token ids to prefill, and each new step into the ids to
append, ending at the token where the step's score is read (the tag, the separator, the
assistant position). Appended step by step, the ids spell what the PRM's own reference code
builds from the whole text at once; anything a step leaves after its read position (a
newline, the assistant's reply) is carried over and starts the next step's ids.

Token ids are looked up from the tokenizer, never hard-coded; a tokenizer that lacks a token
the format needs is refused when the format is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttsearch.errors import ModelLoadError

SENTINEL = "\x00step\x00"  # stands in for a message's content while locating it in a rendered chat


def continuation_ids(tokenizer, anchors: list[str], texts: list[str]) -> list[list[int]]:
    """Ids of each ``texts[i]`` tokenized right after ``anchors[i]`` (the text appended last), so
    that piecewise appends equal tokenizing the whole text: a tokenizer may merge or mark the
    start of a string differently from its middle. One batched tokenizer call."""
    encoded = tokenizer([*(a + t for a, t in zip(anchors, texts)), *anchors], add_special_tokens=False)["input_ids"]
    joined, alone = encoded[: len(texts)], encoded[len(texts) :]
    out = []
    for both, head, anchor, text in zip(joined, alone, anchors, texts):
        if both[: len(head)] != head:
            raise ValueError(
                f"the text {text[:40]!r} tokenizes together with the text before it ({anchor[-40:]!r}), "
                "so it cannot be appended on its own"
            )
        out.append(both[len(head) :])
    return out


def single_token(tokenizer, text: str, what: str) -> int:
    """The id of ``text``, which must be one token of the vocabulary."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ModelLoadError(f"{what}: {text!r} is not a single token of the tokenizer (it encodes to {ids})")
    return ids[0]


def render_chat(tokenizer, messages, **kwargs) -> str:
    if not tokenizer.chat_template:
        raise ModelLoadError("the tokenizer has no chat template, which this format is built from")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, **kwargs)


def sentinel_at(rendered: str, what: str) -> int:
    at = rendered.find(SENTINEL)
    if at < 0:
        raise ModelLoadError(f"{what}: the chat template does not render message content verbatim")
    return at


# --------------------------------------------------------------------------------------------- formats


class StepFormat:
    """``prefix(question) -> (ids, context)``; ``steps(contexts, steps) -> [(ids, context)]``,
    where each step's ids end at its read position. Contexts are immutable (forks share them).

    A format whose text ends every step with a tag, where the step's score is read, names it in
    ``tag`` and can read a text written in it back into its question and steps (``split_text``,
    ``join``, ``split_steps``): what ``POST /pooling`` takes. The others (``tag`` None) mark no
    step in their text that a reader could find."""

    candidates: tuple[int, int] | None = None  # LM-head rows read (good, bad), for token-probability PRMs
    tag: str | None = None  # the text that ends each step, where its score is read
    layout = ""  # how a text in the format reads, for error messages

    def prefix(self, question: str) -> tuple[list[int], object]:
        raise NotImplementedError

    def steps(self, contexts: list, steps: list[str]) -> list[tuple[list[int], object]]:
        raise NotImplementedError

    def split_text(self, text: str) -> tuple[str, str]:
        """(question, solution): a text written in this format cut where its steps begin. A
        ValueError says why the text cannot be read so."""
        raise self._untagged()

    def join(self, question: str, solution: str) -> str:
        """The text this format writes for ``question`` followed by the steps of ``solution``
        (the inverse of ``split_text``)."""
        raise self._untagged()

    def split_steps(self, solution: str) -> tuple[list[str], int]:
        """The steps of ``solution``, each to its tag, as ``steps`` takes them; and how much of
        ``solution`` they cover (to the end of the last tag: text after it is no step)."""
        raise self._untagged()

    def _untagged(self) -> ValueError:
        return ValueError(f"the {type(self).__name__} marks no step in its text")


@dataclass(frozen=True)
class _TaggedContext:
    anchor: str  # the text appended last
    separator: str  # what goes before the next step: the previous step's trailing whitespace


class TaggedFormat(StepFormat):
    """Math-Shepherd: ``f"{question} {steps}"``, every step followed by `` ки`` (the tag) and
    the steps separated by their own trailing whitespace (``"\\n"`` when a step has none);
    P(good) is the softmax of the good/bad token logits at the tag. The candidates are looked
    up as in the model card, ``tokenizer.encode(f"{good} {bad}")`` without special tokens."""

    def __init__(self, tokenizer, tag: str = "ки", good: str = "+", bad: str = "-"):
        self.tokenizer = tokenizer
        self.tag = tag
        tag_ids = tokenizer.encode(tag, add_special_tokens=False) if tag else []
        if not tag_ids or tokenizer.unk_token_id in tag_ids:
            raise ModelLoadError(f"step tag {tag!r} is not in the tokenizer's vocabulary (it encodes to {tag_ids})")
        self.tag_id = tag_ids[-1]  # the score is read at the tag's last token
        pair = tokenizer.encode(f"{good} {bad}", add_special_tokens=False)
        if len(pair) != 2 or tokenizer.unk_token_id in pair:
            raise ModelLoadError(
                f"candidates {good!r}/{bad!r}: {f'{good} {bad}'!r} must encode to two known tokens, got {pair}"
            )
        self.candidates = (pair[0], pair[1])
        self.layout = (f"'{{question}} {{step 1}} {tag}{{whitespace}}{{step 2}} {tag}...': one space before each tag, "
                       "whitespace after it")

    def prefix(self, question):
        return self.tokenizer.encode(question), _TaggedContext(question, " ")

    def steps(self, contexts, steps):
        bodies = [step.rstrip() for step in steps]
        texts = [c.separator + body + " " + self.tag for c, body in zip(contexts, bodies)]
        ids = continuation_ids(self.tokenizer, [c.anchor for c in contexts], texts)
        out = []
        for tokens, text, step, body in zip(ids, texts, steps, bodies):
            if tokens[-1] != self.tag_id:
                raise ValueError(f"step {step[:40]!r}: its tag {self.tag!r} merged with the text before it")
            out.append((tokens, _TaggedContext(text, step[len(body) :] or "\n")))
        return out

    def split_text(self, text):
        # The question and the first step are joined by one space, which nothing else marks; no
        # score depends on which space it is (the PRM reads the same tokens). The first step is
        # taken to be the last word before the first tag, so the question is as long as it can
        # be: the verifier prefills it through its prefix cache, where requests sharing it meet.
        first = text.find(self.tag)
        if first < 0:
            raise ValueError(f"no step tag {self.tag!r} in it: each step must end with {' ' + self.tag!r}")
        head = text[:first]
        head = head[:-1] if head.endswith(" ") else head  # the space the format writes before the tag
        at = head.rfind(" ")
        if at <= 0 or not head[:at].strip():
            raise ValueError(f"the text before the first tag {self.tag!r} must be the question, a space and the "
                             f"first step (the PRM's format is '{{question}} {{step}} {self.tag}'), got {head!r:.80}")
        return text[:at], text[at + 1 :]

    def join(self, question, solution):
        return f"{question} {solution}"

    def split_steps(self, solution):
        pieces = solution.split(self.tag)
        steps = []
        for i, piece in enumerate(pieces[:-1]):
            body = piece.lstrip() if i else piece  # the whitespace before it ends the step before
            body = body[:-1] if body.endswith(" ") else body
            following = pieces[i + 1]
            steps.append(body + following[: len(following) - len(following.lstrip())])
        return steps, len(solution) - len(pieces[-1])


@dataclass(frozen=True)
class _ChatContext:
    question: str
    messages: tuple  # the conversation so far, each step a user turn with the assistant's reply
    committed: str  # the rendered conversation up to the last read position
    anchor: str  # the text appended last


class ChatTurnsFormat(StepFormat):
    """RLHFlow Llama-3.1-8B-PRM: a chat in the tokenizer's own template where each step is a
    user turn (the first is ``f"{question} {step}"``) and each assistant reply is ``+``;
    P(+) against ``-`` is read at the last token before the reply (the assistant header).
    The reply is appended with the next step, as the history the model was trained with."""

    def __init__(self, tokenizer, good: str = "+", bad: str = "-"):
        self.tokenizer = tokenizer
        self.reply = good
        for text in (good, bad):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if not ids or tokenizer.unk_token_id in ids:
                raise ModelLoadError(f"candidate {text!r} is not in the tokenizer's vocabulary (it encodes to {ids})")
        # as RLHFlow's code does: the last token of each
        self.candidates = (tokenizer.encode(good)[-1], tokenizer.encode(bad)[-1])
        render_chat(tokenizer, [{"role": "user", "content": "x"}])  # refuse a tokenizer without a template now

    def prefix(self, question):
        # everything before the first step: the template's opening and the question
        turns = [{"role": "user", "content": f"{question} {SENTINEL}"}, {"role": "assistant", "content": self.reply}]
        rendered = render_chat(self.tokenizer, turns)
        at = sentinel_at(rendered, "the first user turn")
        text = rendered[: at - 1 if rendered[at - 1 : at] == " " else at]  # the space starts the first step
        return self.tokenizer.encode(text, add_special_tokens=False), _ChatContext(question, (), text, text)

    def steps(self, contexts, steps):
        reply = {"role": "assistant", "content": self.reply}
        pieces, nexts = [], []
        for c, step in zip(contexts, steps):
            content = f"{c.question} {step.strip()}" if not c.messages else step.strip()
            messages = (*c.messages, {"role": "user", "content": content})
            asked = render_chat(self.tokenizer, messages, add_generation_prompt=True)
            answered = render_chat(self.tokenizer, (*messages, reply))
            if not (asked.startswith(c.committed) and answered.startswith(asked)):
                raise ValueError("the chat template does not extend a conversation by appending to it")
            piece = asked[len(c.committed) :]
            pieces.append(piece)
            nexts.append(_ChatContext(c.question, (*messages, reply), asked, piece))
        ids = continuation_ids(self.tokenizer, [c.anchor for c in contexts], pieces)
        return list(zip(ids, nexts))


class SeparatorFormat(StepFormat):
    """Qwen2.5-Math-PRM: the chat template with a system prompt, the question as the user turn,
    and the assistant turn holding the steps, each stripped and followed by ``<extra_0>``; the
    2-class head is read at every separator."""

    SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

    def __init__(self, tokenizer, separator: str = "<extra_0>", system_prompt: str = SYSTEM):
        single_token(tokenizer, separator, "step separator")
        self.tokenizer = tokenizer
        self.separator = self.tag = separator
        self.system_prompt = system_prompt
        self.layout = f"the chat template's prompt with the question, then each step stripped, ending with {separator}"
        render_chat(tokenizer, [{"role": "user", "content": "x"}])  # refuse a tokenizer without a template now

    def _messages(self, question: str) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question}]

    def prefix(self, question):
        text = render_chat(self.tokenizer, self._messages(question), add_generation_prompt=True)
        return self.tokenizer.encode(text), text

    def steps(self, contexts, steps):
        texts = [step.strip() + self.separator for step in steps]
        ids = continuation_ids(self.tokenizer, list(contexts), texts)
        return list(zip(ids, texts))

    def _around_question(self) -> tuple[str, str]:
        """The rendered prompt before and after the question."""
        try:
            rendered = render_chat(self.tokenizer, self._messages(SENTINEL), add_generation_prompt=True)
            at = sentinel_at(rendered, "the user turn")
        except ModelLoadError as exc:
            raise ValueError(str(exc)) from exc
        return rendered[:at], rendered[at + len(SENTINEL) :]

    def split_text(self, text):
        # the question is the user turn of the chat template, as the model card renders it
        head, tail = self._around_question()
        if not text.startswith(head):
            raise ValueError(f"it does not start as the PRM's prompt does (its chat template with the system prompt "
                             f"{self.system_prompt!r}): expected {head!r:.200}")
        end = text.find(tail, len(head))
        if end < 0:
            raise ValueError(f"the question's turn does not end as the chat template ends it ({tail!r})")
        return text[len(head) : end], text[end + len(tail) :]

    def join(self, question, solution):
        head, tail = self._around_question()
        return head + question + tail + solution

    def split_steps(self, solution):
        pieces = solution.split(self.separator)  # after the last one, e.g. the turn's end: no step
        return pieces[:-1], len(solution) - len(pieces[-1])


class LineStepFormat(StepFormat):
    """Skywork-o1-Open-PRM, as its ``prepare_input``: ``encode(bos_token + problem + "\\n")``,
    then each line of a step encoded on its own and followed by the step token ``"\\n"``; the
    value head is read at the step's last step token."""

    def __init__(self, tokenizer, step_token: str = "\n"):
        if tokenizer.bos_token is None:
            raise ModelLoadError("the tokenizer has no bos_token, which starts the problem")
        if not step_token:
            raise ModelLoadError("the step token is empty")
        self.tokenizer = tokenizer
        self.step_token = step_token
        self.step_token_id = tokenizer.encode(step_token)[-1]

    def prefix(self, question):
        return self.tokenizer.encode(self.tokenizer.bos_token + question + "\n"), None

    def steps(self, contexts, steps):
        lines_per_step = []
        for step in steps:
            lines = step.split(self.step_token)
            if len(lines) > 1 and lines[-1] == "":
                lines.pop()  # a step ending in the step token: that token closes its last line
            lines_per_step.append(lines)
        flat = [line for lines in lines_per_step for line in lines if line]
        encoded = iter(self.tokenizer(flat)["input_ids"] if flat else [])
        out = []
        for lines in lines_per_step:
            ids = []
            for line in lines:
                ids += (next(encoded) if line else []) + [self.step_token_id]
            out.append((ids, None))
        return out
