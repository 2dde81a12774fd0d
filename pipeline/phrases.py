"""Noun phrases of captions (DetCLIPv2): a concept dictionary, longest-match extraction over
it, optional spaCy noun chunks, and the Parquet tables of the `phrases` stage.

The dictionary holds the vocabulary's categories (split base | novel, with their synonyms) and
the concepts of an optional concept-list file (split "concept"). A concept's surface forms are
its name and synonyms (underscores read as spaces) and the simple English plural of the last
word of each (box -> boxes, star -> stars, berry -> berries), all lower-case. Text is compared
as runs of letters and digits, so matches fall on word boundaries ("star" never matches inside
"starfish") and punctuation or spacing between words does not matter. `phrase_spans` gives
the character span in the caption of every match `extract_phrases` counts (MDETR's
`tokens_positive`, for the pseudo-grounding of stage pseudo_boxes).

`phrases/part-NNNNN.parquet`, one row per pair (`phrases_schema`):

    image_id   int64
    phrases    list<string>      canonical concept names, once each, in order of first mention
    counts     list<int32>       matches of each phrase in the caption
    phrase_emb list<fixed_size_list<float16>[D]>  L2-normalised, prompt-ensembled like the
                                  text stage (a category's phrase has its text embedding)

`phrases/dictionary.parquet` (`dictionary_schema`): name string, split string
(base | novel | concept), embedding fixed_size_list<float32>[D]. Negatives for training come
from the "concept" rows only: base and novel rows are the vocabulary itself.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ovdistill.pipeline.cache import canonical_hash
from ovdistill.pipeline.errors import OvdError, StageError
from ovdistill.pipeline.manifests import Category

CONCEPT_SPLIT = "concept"  # the split of a concept-list entry
_WORD = re.compile(r"[^\W_]+")  # a run of letters / digits (underscore separates words)


class ExtractorUnavailable(OvdError, ImportError):
    """The optional spaCy extractor cannot run here; the message says how to install it."""


# ----------------------------------------------------------------------------- dictionary


def words(text: str) -> tuple[str, ...]:
    """The lower-cased words of `text`: "Red  STAR-fish_x" -> ("red", "star", "fish", "x")."""
    return tuple(_WORD.findall(text.lower()))


def plural(word: str) -> str:
    """The simple English plural: box -> boxes, cross -> crosses, berry -> berries, star ->
    stars (irregular plurals are not guessed: list them as synonyms)."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def surface_forms(names: Iterable[str]) -> list[tuple[str, ...]]:
    """Each name's words and the same with the last word in the plural, first seen first."""
    out: dict[tuple[str, ...], None] = {}
    for n in names:
        w = words(n)
        if w:
            out[w] = None
            out[(*w[:-1], plural(w[-1]))] = None
    return list(out)


@dataclass(frozen=True)
class Concept:
    name: str  # canonical: the annotation file's category name, or the concept list's line
    split: str  # base | novel | concept
    synonyms: tuple[str, ...] = ()  # a category's synonyms (prompted like the text stage)


@dataclass(frozen=True)
class ConceptDictionary:
    """Concepts (categories by id, then the concept list in file order) and the surface forms
    that name them: a form belongs to the first concept that has it."""

    concepts: tuple[Concept, ...]
    forms: Mapping[tuple[str, ...], str] = field(repr=False, hash=False)  # words -> canonical name
    max_words: int = 1

    @classmethod
    def build(cls, categories: Sequence[Category], concept_names: Sequence[str] = ()
              ) -> ConceptDictionary:
        """Categories keep their split and synonyms; a concept-list name that any category
        already has as a surface form (its name, a synonym, their plural) is dropped, and so is
        a list name repeated."""
        concepts = [Concept(c.name, c.split, tuple(c.synonyms)) for c in categories]
        forms: dict[tuple[str, ...], str] = {}
        for c in concepts:
            for f in surface_forms([c.name, *c.synonyms]):
                forms.setdefault(f, c.name)
        for name in concept_names:
            w = words(name)
            if not w or w in forms:
                continue
            concepts.append(Concept(name, CONCEPT_SPLIT))
            for f in surface_forms([name]):
                forms.setdefault(f, name)
        return cls(tuple(concepts), forms, max((len(f) for f in forms), default=1))

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def split_of(self, name: str) -> str | None:
        return next((c.split for c in self.concepts if c.name == name), None)

    def canonical(self, phrase: str) -> str | None:
        """The concept a whole phrase names ("Red stars" -> "red star"), or None."""
        return self.forms.get(words(phrase))

    def fingerprint(self) -> str:
        """A hash of every concept with its split, synonyms and surface forms."""
        return canonical_hash([[c.name, c.split, list(c.synonyms)] for c in self.concepts]
                              + [[" ".join(f), n] for f, n in sorted(self.forms.items())])


def read_concept_list(path: Path) -> list[str]:
    """The concepts of a concept-list file: one per line; '#' starts a comment; blank lines
    and repeats are skipped; inner spaces are collapsed. A missing or non-UTF-8 file is one
    StageError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"concept list {path} is missing (pairs.concepts)") from None
    except UnicodeDecodeError as e:
        raise StageError(f"concept list {path}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None
    except OSError as e:
        raise StageError(f"concept list {path}: cannot be read ({e.strerror})") from None
    out: dict[str, None] = {}
    for line in text.splitlines():
        name = " ".join(line.split("#", 1)[0].split())
        if name:
            out[name] = None
    return list(out)


# ----------------------------------------------------------------------------- extraction


def _chosen(w: Sequence[str], dictionary: ConceptDictionary) -> list[tuple[int, int, str]]:
    """The matches of the word sequence `w`: (first word, word count, canonical name), in
    the order they are taken (longest first, ties: the earlier start). Every (start, length)
    word span that is a surface form is a candidate; one overlapping a taken one is dropped."""
    candidates = []  # (-length, start, name)
    for start in range(len(w)):
        for n in range(min(dictionary.max_words, len(w) - start), 0, -1):
            name = dictionary.forms.get(tuple(w[start:start + n]))
            if name is not None:
                candidates.append((-n, start, name))
    taken = [False] * len(w)
    chosen = []
    for neg_n, start, name in sorted(candidates):
        span = range(start, start - neg_n)
        if not any(taken[i] for i in span):
            for i in span:
                taken[i] = True
            chosen.append((start, -neg_n, name))
    return chosen


def extract_phrases(caption: str, dictionary: ConceptDictionary) -> list[tuple[str, int]]:
    """(canonical name, matches in `caption`) per concept the caption names, in order of first
    mention. Longest match first: every (start, length) word span that is a surface form is a
    candidate; the longest are taken first, a candidate overlapping one already taken is
    dropped (ties: the earlier start wins). Case-insensitive, on word boundaries."""
    chosen = _chosen(words(caption), dictionary)
    counts = Counter(name for _, _, name in chosen)
    first = dict.fromkeys(name for _, _, name in sorted(chosen))
    return [(name, counts[name]) for name in first]


def _lowered_offsets(text: str) -> list[int]:
    """offsets[j] = the index in `text` of the character that made character j of
    `text.lower()` (lower-casing may turn one character into several: "\u0130" -> "i\u0307");
    one extra entry maps the end."""
    out = []
    for i, c in enumerate(text):
        out.extend([i] * len(c.lower()))
    out.append(len(text))
    return out


def phrase_spans(caption: str, dictionary: ConceptDictionary) -> list[tuple[str, int, int]]:
    """(canonical name, start, end) of every match `extract_phrases` counts, in caption
    order: caption[start:end] runs from the first letter of the match's first word to the
    last letter of its last word ("two Red  Stars." -> ("red star", 4, 14)). The same
    longest-match rule, so each name appears exactly as many times as its count."""
    lowered = caption.lower()
    found = list(_WORD.finditer(lowered))
    chosen = _chosen([m.group() for m in found], dictionary)
    where = _lowered_offsets(caption)

    def original_end(j: int) -> int:  # the end, in `caption`, of lowered[:j]
        return where[j - 1] + 1 if j > 0 else 0

    return [(name, where[found[s].start()], original_end(found[s + n - 1].end()))
            for s, n, name in sorted(chosen)]


@lru_cache(maxsize=2)
def load_spacy(model_name: str):
    """spaCy's pipeline `model_name` (imported here only), or one ExtractorUnavailable line
    saying how to install what is missing."""
    how = (f"pip install 'ovdistill[spacy]' && python -m spacy download {model_name}")
    try:
        import spacy
    except ImportError:
        raise ExtractorUnavailable(f"the spaCy phrase extractor needs spaCy and its model "
                                   f"{model_name!r}, not installed: {how}") from None
    try:
        return spacy.load(model_name)
    except OSError:
        raise ExtractorUnavailable(f"the spaCy model {model_name!r} is not installed: "
                                   f"python -m spacy download {model_name}") from None


def spacy_version(model_name: str) -> str:
    """'spacy <version> <model> <model version>' (what the stage's inputs record)."""
    nlp = load_spacy(model_name)
    import spacy

    return f"spacy {spacy.__version__} {model_name} {nlp.meta.get('version', '?')}"


def spacy_noun_chunks(captions: Sequence[str], model_name: str = "en_core_web_sm",
                      batch_size: int = 256) -> list[list[tuple[str, int]]]:
    """Per caption, (noun chunk lower-cased with spaces collapsed, count), in order of first
    mention. Needs spaCy and the model (`load_spacy`); never required otherwise."""
    nlp = load_spacy(model_name)
    out = []
    for doc in nlp.pipe(list(captions), batch_size=batch_size):
        chunks = [" ".join(c.text.lower().split()) for c in doc.noun_chunks]
        chunks = [c for c in chunks if c]
        counts = Counter(chunks)
        out.append([(c, counts[c]) for c in dict.fromkeys(chunks)])
    return out


# ----------------------------------------------------------------------------- tables


def phrases_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("image_id", pa.int64()),
        ("phrases", pa.list_(pa.string())),
        ("counts", pa.list_(pa.int32())),
        ("phrase_emb", pa.list_(pa.list_(pa.float16(), dim))),
    ])


def dictionary_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("name", pa.string()),
        ("split", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),
    ])


def phrases_table(image_ids: Sequence[int], phrases: Sequence[Sequence[tuple[str, int]]],
                  embedding: Mapping[str, np.ndarray], dim: int) -> pa.Table:
    """The phrases part of `image_ids` (one row each, in that order); phrases[i] = (name,
    count) of image i; embedding: name -> float[D] (stored as float16)."""
    offsets, names, counts, vecs = [0], [], [], []
    for row in phrases:
        for name, k in row:
            names.append(name)
            counts.append(k)
            vecs.append(embedding[name])
        offsets.append(len(names))
    flat = (np.stack(vecs).astype(np.float16) if vecs else np.zeros((0, dim), np.float16))
    if flat.shape[1] != dim:
        raise StageError(f"phrase embeddings have D={flat.shape[1]}, expected {dim}")
    off = pa.array(offsets, pa.int32())
    emb = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), dim)
    return pa.Table.from_arrays([
        pa.array(list(image_ids), pa.int64()),
        pa.ListArray.from_arrays(off, pa.array(names, pa.string())),
        pa.ListArray.from_arrays(off, pa.array(counts, pa.int32())),
        pa.ListArray.from_arrays(off, emb),
    ], schema=phrases_schema(dim))


def dictionary_table(dictionary: ConceptDictionary, embeddings: np.ndarray) -> pa.Table:
    """`dictionary.parquet`. embeddings: float[C, D] in `dictionary.concepts` order."""
    emb = np.asarray(embeddings, np.float32)
    dim = emb.shape[1]
    return pa.Table.from_arrays([
        pa.array(dictionary.names, pa.string()),
        pa.array([c.split for c in dictionary.concepts], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
    ], schema=dictionary_schema(dim))


def read_dictionary(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(names, splits, embeddings float32[C, D]) of a `dictionary.parquet`; a file whose
    columns are not the contract's is one StageError naming it."""
    path = Path(path)
    table = pq.read_table(path)
    typ = table.schema.field("embedding").type if "embedding" in table.column_names else None
    dim = getattr(typ, "list_size", 0)
    if not dim or table.schema.remove_metadata() != dictionary_schema(dim):
        raise StageError(f"{path}: columns {table.schema.names} / {typ} are not the "
                         f"dictionary contract (name, split, embedding float32[D])")
    emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return table.column("name").to_pylist(), table.column("split").to_pylist(), emb


def manifest_dictionary(dataset) -> ConceptDictionary:
    """The phrases stage's dictionary of a manifest (pipeline.manifests.DatasetManifest): its
    categories (names, synonyms) plus the `pairs.concepts` list when it names one. The
    pseudo_boxes stage rebuilds the same one to find its phrases' spans."""
    path = dataset.pairs.concepts if dataset.pairs else None
    return ConceptDictionary.build(dataset.categories(), read_concept_list(path) if path else ())
