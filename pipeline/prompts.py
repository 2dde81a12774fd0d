"""GLIP's detection prompts: class names joined into text prompts, with each class's exact
token span, so a detector can be trained and evaluated as a grounding model.

A detection prompt is GLIP's: the names of the classes present and of some random negative
classes, shuffled, each followed by ". " ("red star. blue circle."; the final space is
dropped). A vocabulary longer than the text encoder's context is cut into several prompts,
each class whole in one of them (GLIP chunks LVIS the same way at inference); `names_per_prompt`
caps the names a prompt holds as well (1: each class alone, TrainConfig.grounding_eval_names /
grounding_train_names).

Token spans index the TOKENIZED prompt as the text encoder sees it: position 0 is the
start-of-text token, so a prompt's first name starts at position 1, and its end-of-text token
sits at `Prompt.n_tokens - 1`. They are computed with the tokenizer itself, never guessed
from characters.

`tokenize` everywhere is a `Tokenize`: a string -> its token ids without start/end-of-text
(open_clip's `SimpleTokenizer.encode`; `open_clip_tokenize` adapts a teacher's tokenizer), and
`max_tokens` is the text encoder's context length minus 2 (`max_prompt_tokens`).
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ovdistill.pipeline.errors import OvdError

Tokenize = Callable[[str], Sequence[int]]  # text -> ids without start/end-of-text
SEPARATOR = ". "  # GLIP's: every name is followed by ". "
END = "."  # ... and the prompt's trailing space is dropped


class PromptError(OvdError, ValueError):
    """A prompt cannot be built as asked (a class name longer than the context, a class index
    outside the vocabulary); one line says which."""


@dataclass(frozen=True)
class Prompt:
    """One text prompt and where each of its classes sits in it.

    text: the prompt; classes: its class indices in prompt order; spans: class index ->
    (first token, last token + 1) in the tokenized prompt (position 0 = start-of-text);
    char_spans: class index -> (first char, last char + 1) in `text`; n_tokens: real tokens
    including start- and end-of-text."""

    text: str
    classes: tuple[int, ...]
    spans: dict[int, tuple[int, int]]
    char_spans: dict[int, tuple[int, int]]
    n_tokens: int


def max_prompt_tokens(context_length: int) -> int:
    """The most prompt tokens a text encoder of `context_length` takes (start/end-of-text
    take two)."""
    return int(context_length) - 2


def open_clip_tokenize(tokenizer) -> Tokenize:
    """The `Tokenize` of an open_clip tokenizer (a `Teacher.tokenizer`): its `encode`, which
    cleans and lowercases as its `__call__` does, without start/end-of-text."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None or not hasattr(tokenizer, "sot_token_id"):
        raise PromptError(f"tokenizer {type(tokenizer).__name__} is not open_clip's "
                          f"SimpleTokenizer (no encode / sot_token_id); pass a tokenize "
                          f"callable (text -> ids without start/end-of-text)")
    return encode


def detection_prompts(names: Sequence[str], positives: Iterable[int], rng: random.Random,
                      n_negatives: int, max_tokens: int, tokenize: Tokenize,
                      names_per_prompt: int = 0) -> list[Prompt]:
    """GLIP's training prompts for one image: the classes present plus up to `n_negatives`
    random other classes of `names`, shuffled by `rng`, chunked to at most `max_tokens` tokens
    per prompt (every class whole in exactly one prompt) and at most `names_per_prompt` names
    (0: as many as fit).

    names: the C class names (a class index is a position in it); positives: class indices
    present in the image. Returns [] when there is no class to name."""
    pos = sorted({int(c) for c in positives})
    for c in pos:
        if not 0 <= c < len(names):
            raise PromptError(f"positive class {c} is outside the vocabulary of "
                              f"{len(names)} names")
    if n_negatives < 0:
        raise PromptError(f"n_negatives must be >= 0, got {n_negatives}")
    present = set(pos)
    others = [c for c in range(len(names)) if c not in present]
    chosen = pos + rng.sample(others, min(n_negatives, len(others)))
    rng.shuffle(chosen)
    return _chunk(names, chosen, max_tokens, tokenize, names_per_prompt)


def all_class_prompts(names: Sequence[str], max_tokens: int, tokenize: Tokenize,
                      names_per_prompt: int = 0) -> list[Prompt]:
    """Evaluation prompts: every class of `names` once, in order, chunked as
    `detection_prompts` does, with at most `names_per_prompt` names a prompt (0: as many as
    fit `max_tokens`; 1: one prompt per class, no other name in its context). Deterministic,
    so the prompts' encodings can be cached (`PromptCache`)."""
    return _chunk(names, list(range(len(names))), max_tokens, tokenize, names_per_prompt)


# ----------------------------------------------------------------------------- building


def _chunk(names: Sequence[str], order: list[int], max_tokens: int, tokenize: Tokenize,
           names_per_prompt: int = 0) -> list[Prompt]:
    """Greedy chunks of `order` whose prompts fit `max_tokens` (and hold at most
    `names_per_prompt` names when > 0)."""
    if names_per_prompt < 0:
        raise PromptError(f"names_per_prompt must be >= 0, got {names_per_prompt}")
    tokenize = _memo(tokenize)
    end_len = len(tokenize(END))
    lengths = {}
    for c in order:
        if c not in lengths:
            name = names[c]
            if not name.strip():
                raise PromptError(f"class {c} has an empty name")
            lengths[c] = len(tokenize(name))
            if lengths[c] + end_len > max_tokens:
                raise PromptError(f"class {c} '{name}' takes {lengths[c] + end_len} tokens "
                                  f"with its '{END}', more than a prompt's {max_tokens}")
    prompts, chunk, used = [], [], 0
    for c in order:
        if chunk and (used + lengths[c] + end_len > max_tokens
                      or 0 < names_per_prompt <= len(chunk)):
            prompts.append(_prompt(names, chunk, max_tokens, tokenize))
            chunk, used = [], 0
        chunk.append(c)
        used += lengths[c] + end_len
    if chunk:
        prompts.append(_prompt(names, chunk, max_tokens, tokenize))
    return prompts


def _memo(tokenize: Tokenize) -> Tokenize:
    """`tokenize` remembering its answers (each name is tokenized twice)."""
    seen: dict[str, list[int]] = {}

    def tok(text: str) -> list[int]:
        if text not in seen:
            seen[text] = list(tokenize(text))
        return seen[text]

    return tok


def _prompt(names: Sequence[str], classes: list[int], max_tokens: int, tokenize: Tokenize
            ) -> Prompt:
    """The prompt of `classes` in this order, its char and token spans exact."""
    text, char_spans = "", {}
    for c in classes:
        start = len(text)
        text += names[c]
        char_spans[c] = (start, len(text))
        text += SEPARATOR
    text = text[:-len(SEPARATOR)] + END
    ids = list(tokenize(text))
    if len(ids) > max_tokens:
        raise PromptError(f"prompt '{text[:60]}...' takes {len(ids)} tokens, more than "
                          f"{max_tokens}; the tokenizer is not additive over '{SEPARATOR}'")
    spans = _spans_by_pieces(names, classes, ids, tokenize)
    if spans is None:
        spans = {c: _span_by_prefixes(text, s, e, ids, tokenize)
                 for c, (s, e) in char_spans.items()}
    return Prompt(text=text, classes=tuple(classes), spans=spans, char_spans=char_spans,
                  n_tokens=len(ids) + 2)


def _spans_by_pieces(names, classes, ids, tokenize) -> dict[int, tuple[int, int]] | None:
    """Token spans when the prompt tokenizes as its pieces (each name, each '.') one after
    the other, as open_clip's BPE does for names ending in a letter or digit; None if not."""
    pieces, spans, at = [], {}, 1  # position 0 is start-of-text
    end_ids = list(tokenize(END))
    for c in classes:
        name_ids = list(tokenize(names[c]))
        spans[c] = (at, at + len(name_ids))
        pieces += name_ids + end_ids
        at += len(name_ids) + len(end_ids)
    return spans if pieces == ids else None


def _span_by_prefixes(text: str, start: int, end: int, ids: list[int], tokenize: Tokenize
                      ) -> tuple[int, int]:
    """The tokens of `ids` (the whole of `text`) that overlap text[start:end], found by
    tokenizing the text before and up to the name: the general case, where a name's last
    character merges with the '.' (open_clip: "bow (weapon)." ends in one ')." token)."""
    def common(prefix_ids: list[int]) -> int:
        n = 0
        while n < len(prefix_ids) and n < len(ids) and prefix_ids[n] == ids[n]:
            n += 1
        return n

    before = common(list(tokenize(text[:start])))  # tokens wholly before the name
    upto = list(tokenize(text[:end]))
    last = common(upto)
    if last < len(upto):  # the name's last token merged with what follows it
        last += 1
    if last <= before:
        raise PromptError(f"cannot place '{text[start:end]}' among the tokens of its prompt")
    return before + 1, last + 1  # + start-of-text


# ----------------------------------------------------------------------------- encoding once


class PromptCache:
    """Encodings of prompts by their text, computed once: for a frozen text encoder and
    prompts that repeat (evaluation's `all_class_prompts`).

    encode: list of B texts -> a tuple of tensors with B first (e.g. `Teacher.encode_tokens`'s
    (features [B, T, W], mask [B, T])). `get` returns the same tuple for its texts, in order,
    stacked; at most `max_items` texts are kept (least recently used dropped)."""

    def __init__(self, encode: Callable[[list[str]], tuple], max_items: int = 4096):
        self.encode = encode
        self.max_items = int(max_items)
        self._rows: OrderedDict[str, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, texts: Sequence[str]) -> tuple:
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            out = self.encode(missing)
            for i, t in enumerate(missing):
                self._rows[t] = tuple(x[i] for x in out)
        rows = []
        for t in texts:
            self._rows.move_to_end(t)
            rows.append(self._rows[t])
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))


# ----------------------------------------------------------------------------- captions


def caption_token_spans(caption: str, char_spans: Sequence[tuple[int, int]],
                        tokenize: Tokenize) -> list[tuple[int, int]]:
    """MDETR's `tokens_positive` character spans -> token spans of the tokenized caption.

    caption: the grounding caption (the whole prompt); char_spans: [start, end) character
    offsets into it (a box's spans). Returns one (first token, last token + 1) per span,
    indexed as `Prompt.spans` (position 0 = start-of-text): the tokens that overlap the
    characters, found with the tokenizer itself (`_span_by_prefixes`), so a word the span
    cuts keeps its whole token."""
    ids = list(tokenize(caption))
    tokenize = _memo(tokenize)
    out = []
    for start, end in char_spans:
        if not 0 <= start < end <= len(caption):
            raise PromptError(f"span [{start}, {end}] is outside its caption "
                              f"({len(caption)} characters) or empty")
        out.append(_span_by_prefixes(caption, start, end, ids, tokenize))
    return out


def caption_tokens(caption: str, tokenize: Tokenize) -> int:
    """Real tokens of `caption` as a prompt, start- and end-of-text included (compare with
    the context length; `Prompt.n_tokens` of a class prompt)."""
    return len(list(tokenize(caption))) + 2
