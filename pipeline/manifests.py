"""Dataset manifests (`data_manifests/*.yaml`): where the images and COCO/LVIS-format
annotations are, and the base / novel vocabulary split.

    name: coco_ovd
    format: coco                      # coco | lvis
    root: ${OVD_DATA_ROOT}/coco       # ${VAR} from the environment, {cache} = cache root;
                                      # --data-root overrides
    splits:
      train: {images: train2017, annotations: annotations/instances_train2017.json}
      val:   {images: val2017,   annotations: annotations/instances_val2017.json}
    vocabulary:
      base: [person, ...]             # names as in the annotation file
      novel: [airplane, ...]
      # or, for LVIS:  from_frequency: {base: [f, c], novel: [r]}
    synthetic: {...}                  # only for generated datasets (stages/dataset.py)
    pairs:                            # optional: image-text pairs without boxes (DetCLIPv2)
      format: webdataset              # webdataset (img2dataset: <key>.jpg + <key>.txt in
      path: cc3m/shards               #   .tar files; path = a folder or one .tar) | csv | parquet
      images: cc3m/images             # csv / parquet: the folder image paths are relative to
      image_column: image             # csv / parquet column names
      caption_column: caption
      concepts: concepts.txt          # optional concept list for the phrases stage
      # or, generated: synthetic: {n_images: 2000}   (stages/pairs.py PairSpec)
    grounding:                        # optional: captions with phrases tied to boxes (GLIP)
      annotations: flickr/final_flickr_separateGT_train.json   # MDETR format
      images: flickr/images           # the folder its file_names are relative to
      # or, generated: synthetic: {n_images: 1000}   (stages/synthetic.py GroundingSpec)
    stages: {proposals: {top_m: 300}} # per-stage config overrides
    trainer: {steps: 700}             # trainer/config.py TrainConfig overrides
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml
from ovdistill.pipeline.annotations import AnnotationError, read_json_doc
from ovdistill.pipeline.cache import sha256_file
from ovdistill.pipeline.errors import OvdError

FORMATS = ("coco", "lvis")
PAIR_FORMATS = ("webdataset", "csv", "parquet")
LVIS_FREQUENCIES = ("f", "c", "r")  # frequent, common, rare
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")  # a manifest name: one folder under the cache root


class ManifestError(OvdError, ValueError):
    """A manifest is invalid; the message names the file and the problem in one line."""


@dataclass(frozen=True)
class Split:
    name: str
    images: Path  # folder holding the image files named by the annotations' file_name
    annotations: Path  # COCO/LVIS-format json


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    split: str  # "base" | "novel"
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class PairsSource:
    """The manifest's `pairs:` block: where image-text pairs (no boxes) come from."""

    format: str  # synthetic | webdataset | csv | parquet
    path: Path | None = None  # webdataset: a folder of .tar files or one .tar; csv/parquet: file
    images: Path | None = None  # csv / parquet: image paths are relative to it
    image_column: str = "image"
    caption_column: str = "caption"
    concepts: Path | None = None  # a concept list (one per line) for the phrases stage
    synthetic: dict | None = None  # generated pairs (stages/pairs.py PairSpec)


@dataclass(frozen=True)
class GroundingSource:
    """The manifest's `grounding:` block: where grounding data (MDETR's format: captions whose
    `tokens_positive` spans point at boxes) comes from."""

    format: str  # synthetic | mdetr
    annotations: Path | None = None  # mdetr: the COCO-format json with captions and spans
    images: Path | None = None  # mdetr: the folder its images' file_names are relative to
    synthetic: dict | None = None  # generated grounding data (stages/synthetic.py GroundingSpec)


@dataclass(frozen=True)
class DatasetManifest:
    name: str
    format: str
    root: Path
    splits: dict[str, Split]
    path: Path
    sha256: str
    base: tuple[str, ...] | None = None
    novel: tuple[str, ...] | None = None
    from_frequency: dict[str, tuple[str, ...]] | None = None
    synthetic: dict | None = None
    stages: dict = field(default_factory=dict)
    trainer: dict = field(default_factory=dict)
    pairs: PairsSource | None = None
    grounding: GroundingSource | None = None

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ManifestError(f"{self.path}: no split '{name}' (have {sorted(self.splits)})")
        return self.splits[name]

    def check_files(self) -> None:
        """Fail with one line naming the first missing image folder or annotation file."""
        for s in self.splits.values():
            if not s.annotations.is_file():
                what = "is not a file" if s.annotations.exists() else "is missing"
                raise ManifestError(f"{self.path}: split '{s.name}': annotation file "
                                    f"{s.annotations} {what}")
            if not s.images.is_dir():
                what = "is not a folder" if s.images.exists() else "is missing"
                raise ManifestError(f"{self.path}: split '{s.name}': image folder "
                                    f"{s.images} {what}")

    def image_path(self, split: str, image: dict) -> Path:
        """Where the image of annotation record `image` lives (see `image_file`)."""
        return image_path(self.split(split).images, image)

    def categories(self) -> list[Category]:
        """Base and novel categories with their annotation-file ids, sorted by id.

        Read from the val split's annotation file (it holds every category; the train file of
        an open-vocabulary split may hold only the base ones)."""
        self.check_files()
        ann = self.splits.get("val", next(iter(self.splits.values()))).annotations
        stat = ann.stat()  # part of the cache key: a regenerated file is read again
        return list(_categories(str(ann), (stat.st_mtime_ns, stat.st_size), self.format,
                                self.base, self.novel, _freeze(self.from_frequency),
                                str(self.path)))


def image_file(image: dict) -> str:
    """The file of a COCO/LVIS image record, relative to its split's image folder.

    COCO records carry `file_name`. LVIS v1 records carry only `coco_url`
    (".../train2017/000000391895.jpg"); its last two parts are used, because LVIS val holds
    images of both COCO train2017 and val2017 (so an LVIS split's image folder is the root
    holding train2017/ and val2017/). The name is not checked here: make paths with
    `image_path` / `contained_path`, which refuse names that leave the folder."""
    if image.get("file_name"):
        name = str(image["file_name"])
    elif image.get("coco_url"):
        name = "/".join(str(image["coco_url"]).rstrip("/").split("/")[-2:])
    else:
        raise ManifestError(f"image record {image.get('id')!r} has neither file_name nor coco_url")
    return name


def is_plain_relative(name: str) -> bool:
    """True for a non-empty relative path without '..' parts (POSIX or Windows spelling)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return bool(name) and not (posix.is_absolute() or windows.is_absolute() or windows.drive
                               or windows.root or ".." in posix.parts or ".." in windows.parts)


def contained_path(folder: str | Path, name: str) -> Path:
    """folder / name for a file named by received data (an annotation, a caption row).

    Raises ManifestError when `name` is absolute, has '..' parts, or resolves (through
    symbolic links) outside the resolved `folder`."""
    folder = Path(folder)
    if not is_plain_relative(name):
        raise ManifestError(f"file name {name!r} is absolute or has '..' parts; refused "
                            f"(files must stay inside {folder})")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ManifestError(f"{path}: resolves outside {folder}; refused")
    return path


def image_path(folder: str | Path, image: dict) -> Path:
    """Where the image of a COCO/LVIS record lives under its split's image folder; refused
    (ManifestError naming the record) when its name would leave the folder."""
    try:
        return contained_path(folder, image_file(image))
    except ManifestError as e:
        raise ManifestError(f"image record {image.get('id')!r}: {e}") from None


def _freeze(d: dict | None):
    return None if d is None else tuple(sorted((k, tuple(v)) for k, v in d.items()))


@lru_cache(maxsize=8)
def _categories(ann_path: str, _stat: tuple, fmt: str, base, novel, from_frequency,
                manifest_path: str):
    try:
        cats = read_json_doc(ann_path)["categories"]
        names = Counter(str(c["name"]) for c in cats)
        ids = Counter(int(c["id"]) for c in cats)
    except AnnotationError as e:  # the file itself: the reader's line names it
        raise ManifestError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{ann_path}: cannot read categories ({type(e).__name__}: {e})"
                            ) from None
    dup = sorted(n for n, k in names.items() if k > 1) or sorted(i for i, k in ids.items() if k > 1)
    if dup:
        raise ManifestError(f"{ann_path}: categories {dup[:5]} appear more than once")
    if from_frequency is not None:
        rule = dict(from_frequency)
        which = {}
        for split in ("base", "novel"):
            for freq in rule.get(split, ()):
                which[freq] = split
        out = []
        for c in cats:
            if "frequency" not in c:
                raise ManifestError(
                    f"{ann_path}: category {c.get('name')!r} has no 'frequency' field "
                    f"(from_frequency needs an LVIS-format file)"
                )
            if c["frequency"] in which:
                out.append(Category(int(c["id"]), c["name"], which[c["frequency"]],
                                    tuple(c.get("synonyms", ()))))
        if not any(c.split == "base" for c in out):
            raise ManifestError(f"{manifest_path}: from_frequency selects no base category "
                                f"in {ann_path}")
        return tuple(sorted(out, key=lambda c: c.id))
    by_name = {c["name"]: c for c in cats}
    out = []
    for split, names in (("base", base), ("novel", novel)):
        for n in names:
            if n not in by_name:
                raise ManifestError(
                    f"{manifest_path}: unknown {split} category {n!r}: not in {ann_path}"
                )
            c = by_name[n]
            out.append(Category(int(c["id"]), n, split, tuple(c.get("synonyms", ()))))
    return tuple(sorted(out, key=lambda c: c.id))


def _as_list(value, path: Path, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ManifestError(f"{path}: {where} must be a list, got {type(value).__name__}")
    return list(value)


_ENV = re.compile(r"\$\{(\w+)\}")


def _expand(value: str, cache_root: Path | None, where: str) -> str:
    def env(m):
        if m.group(1) not in os.environ:
            raise ManifestError(f"{where}: environment variable {m.group(1)} is not set "
                                f"(or pass --data-root)")
        return os.environ[m.group(1)]

    value = _ENV.sub(env, value)
    if "{cache}" in value:
        if cache_root is None:
            raise ManifestError(f"{where}: root uses {{cache}} but no cache root was given")
        value = value.replace("{cache}", str(cache_root))
    return value


def load_manifest(path: str | Path, cache_root: str | Path | None = None,
                  data_root: str | Path | None = None) -> DatasetManifest:
    """Parse and validate a manifest (files are checked later, by `check_files`)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    for key in ("name", "format", "splits", "vocabulary"):
        if key not in doc:
            raise ManifestError(f"{path}: missing required key '{key}'")
    name = str(doc["name"])
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ManifestError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-' "
                            f"(it names the dataset's folder under the cache root)")
    if doc["format"] not in FORMATS:
        raise ManifestError(f"{path}: format must be one of {FORMATS}, got {doc['format']!r}")
    if data_root is not None:
        root = Path(data_root)
    elif "root" in doc:
        root = Path(_expand(str(doc["root"]), Path(cache_root) if cache_root else None,
                            str(path)))
    else:
        raise ManifestError(f"{path}: missing required key 'root' (or pass --data-root)")
    root = root.absolute()  # stage workers (Ray, subprocesses) may run in another folder

    if not isinstance(doc["splits"], dict):
        raise ManifestError(f"{path}: splits must be a mapping of split name to "
                            f"{{images, annotations}}")
    splits = {}
    for name, s in doc["splits"].items():
        if not isinstance(s, dict) or "images" not in s or "annotations" not in s:
            raise ManifestError(f"{path}: split '{name}' needs 'images' and 'annotations'")
        splits[name] = Split(name, root / s["images"], root / s["annotations"])
    if "train" not in splits:
        raise ManifestError(f"{path}: a 'train' split is required")
    seen: dict[Path, str] = {}
    for s in splits.values():
        if s.annotations in seen:
            raise ManifestError(f"{path}: splits '{seen[s.annotations]}' and '{s.name}' use the "
                                f"same annotation file {s.annotations}")
        seen[s.annotations] = s.name

    voc = doc["vocabulary"] or {}
    if not isinstance(voc, dict):
        raise ManifestError(f"{path}: vocabulary must be a mapping")
    base = novel = from_frequency = None
    if "from_frequency" in voc:
        rule = voc["from_frequency"]
        if not isinstance(rule, dict) or set(rule) - {"base", "novel"} or "base" not in rule:
            raise ManifestError(f"{path}: from_frequency must map 'base' (and 'novel') to "
                                f"lists of LVIS frequencies {list(LVIS_FREQUENCIES)}")
        from_frequency = {k: tuple(str(x) for x in _as_list(v, path, f"from_frequency.{k}"))
                          for k, v in rule.items()}
        for k, freqs in from_frequency.items():
            bad = sorted(set(freqs) - set(LVIS_FREQUENCIES))
            if bad:
                raise ManifestError(f"{path}: from_frequency.{k}: unknown frequencies {bad} "
                                    f"(use {list(LVIS_FREQUENCIES)})")
        overlap = set(from_frequency.get("base", ())) & set(from_frequency.get("novel", ()))
        if overlap:
            raise ManifestError(f"{path}: frequencies {sorted(overlap)} are both base and novel")
    else:
        if "base" not in voc or "novel" not in voc:
            raise ManifestError(f"{path}: vocabulary needs 'base' and 'novel' lists "
                                f"(or 'from_frequency')")
        base = tuple(str(n) for n in _as_list(voc["base"], path, "vocabulary.base"))
        novel = tuple(str(n) for n in _as_list(voc["novel"], path, "vocabulary.novel"))
        for split, names in (("base", base), ("novel", novel)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ManifestError(f"{path}: {split} lists {dup} more than once")
        overlap = sorted(set(base) & set(novel))
        if overlap:
            raise ManifestError(f"{path}: categories {overlap} are in both base and novel")
        if not base:
            raise ManifestError(f"{path}: the base vocabulary is empty")

    stages = doc.get("stages") or {}
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ManifestError(f"{path}: stages must map a stage name to its config overrides")

    pairs = _pairs_source(doc.get("pairs"), root, path)
    grounding = _grounding_source(doc.get("grounding"), root, path)

    return DatasetManifest(
        name=str(doc["name"]),
        format=doc["format"],
        root=root,
        splits=splits,
        path=path.resolve(),
        sha256=sha256_file(path),
        base=base,
        novel=novel,
        from_frequency=from_frequency,
        synthetic=doc.get("synthetic"),
        stages=dict(stages),
        trainer=dict(doc.get("trainer") or {}),
        pairs=pairs,
        grounding=grounding,
    )


def _pairs_source(block, root: Path, path: Path) -> PairsSource | None:
    """The `pairs:` block, validated (files are checked by the pairs stage)."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ManifestError(f"{path}: pairs must be a mapping (format, path, ... or synthetic)")
    known = {"format", "path", "images", "image_column", "caption_column", "concepts",
             "synthetic"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise ManifestError(f"{path}: pairs: unknown key(s) {unknown}; known: {sorted(known)}")
    concepts = root / str(block["concepts"]) if block.get("concepts") else None
    if "synthetic" in block:
        if not isinstance(block["synthetic"], dict):
            raise ManifestError(f"{path}: pairs.synthetic must be a mapping")
        extra = sorted(set(block) - {"synthetic", "concepts"})
        if extra:
            raise ManifestError(f"{path}: pairs: generated pairs take no {extra}")
        return PairsSource("synthetic", concepts=concepts, synthetic=dict(block["synthetic"]))
    fmt = block.get("format")
    if fmt not in PAIR_FORMATS:
        raise ManifestError(f"{path}: pairs.format must be one of {PAIR_FORMATS} (or give "
                            f"pairs.synthetic), got {fmt!r}")
    if not block.get("path"):
        raise ManifestError(f"{path}: pairs.path is required for format {fmt}")
    where = root / str(block["path"])
    images = root / str(block["images"]) if block.get("images") else None
    if fmt == "webdataset" and images is not None:
        raise ManifestError(f"{path}: pairs.images is for csv / parquet; webdataset images "
                            f"are inside the .tar files")
    if fmt != "webdataset" and images is None:
        images = where.parent
    return PairsSource(fmt, where, images, str(block.get("image_column", "image")),
                       str(block.get("caption_column", "caption")), concepts)


def _grounding_source(block, root: Path, path: Path) -> GroundingSource | None:
    """The `grounding:` block, validated (the files are checked by the grounding stage)."""
    if block is None:
        return None
    known = ("annotations", "images", "synthetic")
    if not isinstance(block, dict):
        raise ManifestError(f"{path}: grounding must be a mapping (annotations and images, "
                            f"or synthetic)")
    unknown = sorted(set(block) - set(known))
    if unknown:
        raise ManifestError(f"{path}: grounding: unknown key(s) {unknown}; known: "
                            f"{sorted(known)}")
    if "synthetic" in block:
        if not isinstance(block["synthetic"], dict):
            raise ManifestError(f"{path}: grounding.synthetic must be a mapping")
        extra = sorted(set(block) - {"synthetic"})
        if extra:
            raise ManifestError(f"{path}: grounding: generated grounding data takes no {extra}")
        return GroundingSource("synthetic", synthetic=dict(block["synthetic"]))
    missing = [k for k in ("annotations", "images") if not block.get(k)]
    if missing:
        raise ManifestError(f"{path}: grounding needs {' and '.join(missing)} (an MDETR-format "
                            f"json and its image folder) or synthetic")
    return GroundingSource("mdetr", root / str(block["annotations"]), root / str(block["images"]))
