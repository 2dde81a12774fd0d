"""GLIP's detection prompts on hand cases, with open_clip's own tokenizer: every class's token
span decodes back to its name, shuffling is seeded, negatives respect their count and never
repeat a positive, chunking keeps every class whole within the context, and repeated prompts
are encoded once."""
from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from open_clip.tokenizer import SimpleTokenizer
from ovdistill.pipeline.prompts import (
    Prompt,
    PromptCache,
    PromptError,
    all_class_prompts,
    detection_prompts,
    max_prompt_tokens,
    open_clip_tokenize,
)

TOKENIZER = SimpleTokenizer(context_length=77)
TOKENIZE = open_clip_tokenize(TOKENIZER)
MAX = max_prompt_tokens(77)
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
TOY = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # the embedded benchmark's 24
ODD = ["Traffic Light", "bow (weapon)", "teddy_bear", "t-shirt", "person", "hot-air balloon",
       "bow (decorative ribbons)", "Person's hat", "42nd street"]


def token_ids(prompt: Prompt) -> list[int]:
    """The prompt as the text encoder sees it: open_clip's tokenizer, sot/eot included."""
    return TOKENIZER([prompt.text])[0].tolist()


def squash(text: str) -> str:
    return "".join(text.lower().split())


def assert_exact(prompt: Prompt, names: list[str]) -> None:
    """Spans decode to the names, char spans cut them out, sot/eot where n_tokens says."""
    ids = token_ids(prompt)
    assert ids[0] == TOKENIZER.sot_token_id
    assert ids[prompt.n_tokens - 1] == TOKENIZER.eot_token_id
    assert prompt.n_tokens - 2 <= MAX
    assert list(prompt.spans) == list(prompt.classes) == list(prompt.char_spans)
    for c, (start, end) in prompt.spans.items():
        s, e = prompt.char_spans[c]
        assert prompt.text[s:e] == names[c]
        decoded = squash(TOKENIZER.decode(ids[start:end]))
        name = squash(names[c])
        if name[-1].isalnum():
            assert decoded == name, (names[c], decoded)
        else:  # a trailing ')' is one token with the '.' after it
            assert decoded == name + ".", (names[c], decoded)
    ordered = sorted(prompt.spans.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:]))  # no two classes overlap


def test_spans_decode_to_the_names():
    for names in (TOY, ODD):
        prompts = all_class_prompts(names, MAX, TOKENIZE)
        assert len(prompts) == 1
        assert prompts[0].classes == tuple(range(len(names)))
        assert_exact(prompts[0], names)
    assert all_class_prompts(["red star", "blue circle"], MAX, TOKENIZE)[0] == Prompt(
        text="red star. blue circle.", classes=(0, 1), spans={0: (1, 3), 1: (4, 6)},
        char_spans={0: (0, 8), 1: (10, 21)}, n_tokens=8)


def test_names_per_prompt_caps_each_evaluation_prompt():
    singles = all_class_prompts(TOY, MAX, TOKENIZE, names_per_prompt=1)
    assert [p.classes for p in singles] == [(c,) for c in range(len(TOY))]
    for p in singles:
        assert_exact(p, TOY)
    assert singles[1].text == TOY[1] + "." and singles[1].char_spans == {1: (0, len(TOY[1]))}
    pairs = all_class_prompts(TOY, MAX, TOKENIZE, names_per_prompt=2)
    assert [p.classes for p in pairs] == [tuple(range(i, min(i + 2, len(TOY))))
                                          for i in range(0, len(TOY), 2)]
    # a cap above what the context holds changes nothing
    assert all_class_prompts(TOY, MAX, TOKENIZE, names_per_prompt=len(TOY) + 5) == \
        all_class_prompts(TOY, MAX, TOKENIZE)
    # both limits bind: 8 tokens hold two names ("red circle." = 3 tokens), so a cap of 3
    # names changes nothing and a cap of 1 still cuts
    tight = all_class_prompts(TOY, 8, TOKENIZE)
    assert max(len(p.classes) for p in tight) == 2
    assert all_class_prompts(TOY, 8, TOKENIZE, names_per_prompt=3) == tight
    assert [p.classes for p in all_class_prompts(TOY, 8, TOKENIZE, names_per_prompt=1)] == \
        [(c,) for c in range(len(TOY))]
    with pytest.raises(PromptError, match="names_per_prompt must be >= 0"):
        all_class_prompts(TOY, MAX, TOKENIZE, names_per_prompt=-1)


def test_names_per_prompt_caps_each_training_prompt():
    packed = detection_prompts(TOY, {3, 7}, random.Random(4), 6, MAX, TOKENIZE)
    single = detection_prompts(TOY, {3, 7}, random.Random(4), 6, MAX, TOKENIZE,
                               names_per_prompt=1)
    # the same classes in the same shuffled order, one per prompt
    assert [p.classes for p in single] == [(c,) for p in packed for c in p.classes]
    assert len(single) == 8
    for p in single:
        assert_exact(p, TOY)
    triples = detection_prompts(TOY, {3, 7}, random.Random(4), 6, MAX, TOKENIZE,
                                names_per_prompt=3)
    assert [len(p.classes) for p in triples] == [3, 3, 2]
    with pytest.raises(PromptError, match="names_per_prompt must be >= 0"):
        detection_prompts(TOY, {3}, random.Random(0), 1, MAX, TOKENIZE, names_per_prompt=-2)


def test_detection_prompts_are_seeded_and_exact():
    def build(seed: int) -> list[Prompt]:
        return detection_prompts(TOY, {3, 7}, random.Random(seed), 10, MAX, TOKENIZE)

    assert build(5) == build(5)
    orders = {tuple(c for p in build(seed) for c in p.classes) for seed in range(6)}
    assert len(orders) == 6
    for p in build(1):
        assert_exact(p, TOY)
    mixed = detection_prompts(ODD, {1, 2}, random.Random(0), 20, MAX, TOKENIZE)
    for p in mixed:
        assert_exact(p, ODD)


@pytest.mark.parametrize("n_negatives", [0, 1, 5, 22, 50])
def test_negatives_respect_their_count_and_never_repeat_a_positive(n_negatives):
    positives = {0, 5}
    for seed in range(5):
        prompts = detection_prompts(TOY, positives, random.Random(seed), n_negatives, MAX,
                                    TOKENIZE)
        classes = [c for p in prompts for c in p.classes]
        assert len(classes) == len(set(classes))
        assert positives <= set(classes)
        negatives = set(classes) - positives
        assert len(negatives) == min(n_negatives, len(TOY) - len(positives))


def test_no_class_no_prompt():
    assert detection_prompts(TOY, set(), random.Random(0), 0, MAX, TOKENIZE) == []
    assert all_class_prompts([], MAX, TOKENIZE) == []


@pytest.mark.parametrize("max_tokens", [3, 6, 7, 10, 16, 31])
def test_chunking_keeps_every_class_whole_within_the_context(max_tokens):
    for names in (TOY, ODD):
        if names is ODD and max_tokens < 6:
            continue  # 'bow (decorative ribbons).' takes 6
        prompts = all_class_prompts(names, max_tokens, TOKENIZE)
        assert [c for p in prompts for c in p.classes] == list(range(len(names)))
        for p in prompts:
            assert len(TOKENIZE(p.text)) <= max_tokens
            assert_exact(p, names)
        if max_tokens <= 10:
            assert len(prompts) > 1
    rng = random.Random(3)
    prompts = detection_prompts(TOY, {1, 2, 3}, rng, 21, 10, TOKENIZE)
    assert sorted(c for p in prompts for c in p.classes) == list(range(len(TOY)))
    assert all(len(TOKENIZE(p.text)) <= 10 for p in prompts)


def test_a_class_longer_than_the_context_is_one_line():
    with pytest.raises(PromptError, match="'bow \\(decorative ribbons\\)' takes 6 tokens") as e:
        all_class_prompts(["red star", "bow (decorative ribbons)"], 5, TOKENIZE)
    assert "\n" not in str(e.value)
    with pytest.raises(PromptError, match="positive class 24 is outside"):
        detection_prompts(TOY, {24}, random.Random(0), 0, MAX, TOKENIZE)
    with pytest.raises(PromptError, match="empty name"):
        all_class_prompts(["red star", " "], MAX, TOKENIZE)
    with pytest.raises(PromptError, match="not open_clip's SimpleTokenizer"):
        open_clip_tokenize(lambda texts: None)


def test_prompt_cache_encodes_each_text_once():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        feats = torch.stack([torch.full((3, 2), float(len(t))) for t in texts])
        return feats, torch.ones(len(texts), 3, dtype=torch.bool)

    cache = PromptCache(encode, max_items=2)
    feats, mask = cache.get(["ab", "abc", "ab"])
    assert feats.shape == (3, 3, 2) and mask.shape == (3, 3)
    assert feats[:, 0, 0].tolist() == [2.0, 3.0, 2.0]
    assert cache.get(["abc"])[0][0, 0, 0] == 3.0
    assert calls == [["ab", "abc"]]
    cache.get(["abcd"])  # beyond max_items: the least recently used ("ab") goes
    assert len(cache) == 2
    cache.get(["ab"])
    assert calls == [["ab", "abc"], ["abcd"], ["ab"]]
