"""Image-text pairs (no boxes, DetCLIPv2): the rows the `pairs` stage writes and how any later
stage reads a pair's image back.

`pairs/part-NNNNN.parquet`, one row per pair:

    image_id int64   1..N in source order (its own id space: pairs never mix with detection)
    caption  string
    file     string  the image file, relative to `pair_image_root`; for a webdataset source
                     the .tar holding it
    offset   int64   webdataset: the member's data offset in that .tar; -1 for a plain file
    size     int64   webdataset: the member's data size; -1 for a plain file
    width    int32   the decoded image's size
    height   int32

A real source is listed (`list_pairs`) into `PairEntry` rows in source order: img2dataset's
WebDataset output (`<key>.jpg` + `<key>.txt` per key in uncompressed .tar files; a folder of
them, taken in name order, or one .tar) or a CSV / Parquet table of (image path, caption) with
image paths relative to the source's image folder. Every listed key or row gets the next
image_id, a bad one too (it becomes a reject of the pairs stage and leaves a gap), so ids never
depend on which images decode.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import canonical_hash, sha256_file
from ovdistill.pipeline.errors import StageError
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import (
    DatasetManifest,
    ManifestError,
    PairsSource,
    contained_path,
    is_plain_relative,
)
from PIL import Image

PAIRS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("caption", pa.string()),
    ("file", pa.string()),
    ("offset", pa.int64()),
    ("size", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


def pair_image_root(dataset: DatasetManifest, cache: DatasetCache) -> Path:
    """The folder a pairs row's `file` is relative to: the pairs stage folder for generated
    pairs, the image folder of a csv / parquet source, the folder of a webdataset source's
    .tar files."""
    src = dataset.pairs
    if src is None:
        raise StageError(f"{dataset.path}: no pairs: block (image-text pairs)")
    if src.format == "synthetic":
        return cache.stage_dir(layout.PAIRS)
    if src.format == "webdataset":
        return src.path.parent if src.path.suffix == ".tar" else src.path
    return src.images


def pair_label(root: Path, file: str, offset: int = -1) -> str:
    """How errors name a pair's image: its file, and the member's offset inside a .tar."""
    where = Path(root) / file
    return f"{where}" if offset < 0 else f"{where} (member at offset {offset})"


def pair_image_bytes(root: Path, file: str, offset: int = -1, size: int = -1) -> bytes:
    """The encoded image of one pairs row: the file's bytes, or `size` bytes at `offset` of a
    .tar. Raises ManifestError for a name that leaves `root`, OSError for an unreadable file."""
    path = contained_path(root, file)
    if offset < 0:
        return path.read_bytes()
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: {size} bytes at offset {offset} run past the end of the file")
    return data


def read_pairs(cache: DatasetCache, columns: list[str] | None = None) -> pa.Table:
    """Every finished pairs row, sorted by image_id (empty when the dataset has no pairs)."""
    files = cache.parts(layout.PAIRS)
    if not files:
        return PAIRS_SCHEMA.empty_table() if columns is None else \
            pa.schema([PAIRS_SCHEMA.field(c) for c in columns]).empty_table()
    t = pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    return t.sort_by("image_id") if "image_id" in t.column_names else t


# ----------------------------------------------------------------------------- real sources

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a webdataset key's image member, by rank
CAPTION_EXTENSION = "txt"


class PairEntry(NamedTuple):
    """One listed pair of a real source (a plain tuple: it travels in a stage's plan)."""

    image_id: int
    file: str  # relative to `pair_image_root`: the .tar, or the image file
    offset: int  # webdataset: the image member's data offset; -1 for a plain file
    size: int  # webdataset: the image member's data size; -1 for a plain file
    caption: str | None  # None: the source has none for this key / row
    where: str  # for messages: "<tar>:<key>" or "<table> row <n>"
    problem: str | None = None  # why it cannot be a pair, known from the listing alone


def webdataset_tars(path: Path) -> list[Path]:
    """The .tar files of a webdataset source: `path` itself, or the folder's *.tar by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StageError(f"pairs source {path} is missing (a folder of .tar files or one .tar)")
    tars = sorted(p for p in path.glob("*.tar") if p.is_file())
    if not tars:
        raise StageError(f"pairs source {path}: no .tar files in the folder")
    return tars


def _split_key(name: str) -> tuple[str, str]:
    """"00001.jpg" -> ("00001", "jpg"); WebDataset's rule: the key ends at the basename's
    first dot ("a/b.c.txt" -> ("a/b", "c.txt"))."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def list_webdataset(path: Path) -> list[PairEntry]:
    """Every key of a webdataset source, in tar order then member order.

    A key's image is its first member of IMAGE_EXTENSIONS, its caption the UTF-8 text of its
    .txt member (surrounding whitespace stripped); `offset` / `size` locate the image's bytes
    in the .tar (`pair_image_bytes`). A key without either member is listed with its problem.
    Raises StageError naming the .tar for a file that is not an uncompressed tar or is cut
    short."""
    tars = webdataset_tars(path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    out: list[PairEntry] = []
    for tar in tars:
        rel = tar.relative_to(root).as_posix()
        keys: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    keys.setdefault(key, {}).setdefault(ext, m)
                captions = {}
                for key, members in keys.items():
                    txt = members.get(CAPTION_EXTENSION)
                    if txt is not None:
                        captions[key] = tf.extractfile(txt).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise StageError(f"{tar}: not a readable uncompressed .tar "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        for key, members in keys.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            raw = captions.get(key)
            caption, problem = None, None
            if raw is not None:
                try:
                    caption = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    problem = "the .txt caption is not UTF-8 text"
            if image is None:
                problem = f"no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
            elif raw is None:
                problem = "no .txt caption member"
            out.append(PairEntry(len(out) + 1, rel,
                                 image.offset_data if image is not None else -1,
                                 image.size if image is not None else -1,
                                 caption, f"{tar.name}:{key}", problem))
    return out


def _read_table(path: Path, fmt: str, columns: list[str]) -> pa.Table:
    if not Path(path).is_file():
        raise StageError(f"pairs source {path} is missing (a {fmt} file)")
    try:
        if fmt == "csv":
            t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}))
        else:
            have = pq.read_schema(path).names
            t = pq.read_table(path, columns=[c for c in columns if c in have])
    except (pa.ArrowException, OSError) as e:
        raise StageError(f"{path}: cannot read as {fmt} ({str(e).splitlines()[0]})") from None
    missing = [c for c in columns if c not in t.column_names]
    if missing:
        raise StageError(f"{path}: no column {missing[0]!r} (columns: {t.column_names}); "
                         f"set pairs.image_column / pairs.caption_column")
    return t


def list_table(path: Path, fmt: str, image_column: str = "image",
               caption_column: str = "caption") -> list[PairEntry]:
    """Every row of a CSV / Parquet source of (image path, caption), in file order. A row
    whose path is empty, absolute or has '..' parts is listed with its problem (refused: its
    file is never opened)."""
    t = _read_table(Path(path), fmt, [image_column, caption_column])
    images = t[image_column].cast(pa.string()).to_pylist()
    captions = t[caption_column].cast(pa.string()).to_pylist()
    out: list[PairEntry] = []
    for row, (image, caption) in enumerate(zip(images, captions), 1):
        problem = None
        if not image:
            problem = f"no image path in column {image_column!r}"
        elif not is_plain_relative(image):
            problem = (f"image path {image!r} is absolute or has '..' parts; refused (files "
                       f"must stay inside the pairs image folder)")
        out.append(PairEntry(row, image or "", -1, -1,
                             None if caption is None else caption.strip(),
                             f"{Path(path).name} row {row}", problem))
    return out


def list_pairs(source: PairsSource) -> list[PairEntry]:
    """The listing of a real pairs source (webdataset, csv or parquet)."""
    if source.format == "webdataset":
        return list_webdataset(source.path)
    if source.format in ("csv", "parquet"):
        return list_table(source.path, source.format, source.image_column,
                          source.caption_column)
    raise StageError(f"pairs format {source.format!r} is not a real source (webdataset, csv "
                     f"or parquet)")


def source_fingerprint(source: PairsSource) -> str:
    """What a real source's listing depends on: csv / parquet the file's sha256, webdataset
    a hash of its sorted (tar name, size) list (hashing every tar would read the whole
    dataset)."""
    if source.format == "webdataset":
        tars = webdataset_tars(source.path)
        return canonical_hash(sorted((t.name, t.stat().st_size) for t in tars))
    if not Path(source.path).is_file():
        raise StageError(f"pairs source {source.path} is missing (a {source.format} file)")
    return sha256_file(source.path)


class PairImage(NamedTuple):
    """Where one pair's image is (a pairs row) and the size the pairs stage decoded;
    `str()` is the file a reject names."""

    root: str
    file: str
    offset: int
    size: int
    width: int
    height: int

    def __str__(self) -> str:
        return str(Path(self.root) / self.file)


def load_pair_image(source: PairImage, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded RGB image of a pair; ImageError (one line naming the pair) when it cannot
    be read or decoded or is no longer the size its pairs row recorded."""
    name = pair_label(Path(source.root), source.file, source.offset)
    try:
        data = pair_image_bytes(Path(source.root), source.file, source.offset, source.size)
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    except ManifestError as e:
        raise ImageError(str(e)) from None
    image = decode_rgb(data, name, max_pixels)
    if image.size != (source.width, source.height):
        raise ImageError(f"{name}: decoded size {image.width}x{image.height} differs from the "
                         f"pairs row's {source.width}x{source.height}")
    return image
