"""Stage `pairs`: the image-text pairs of the manifest's `pairs:` block (no boxes; DetCLIPv2),
as `pairs/part-NNNNN.parquet` rows of PAIRS_SCHEMA (pipeline/pair_sources.py).

Generated (`pairs: {synthetic: {...}}`, PairSpec): scenes like the detection images drawn from
the whole vocabulary, base and novel alike, each with a caption naming some of its objects
(stages/synthetic.py `pair_caption`). Image `index` has its own stream
`default_rng([seed, 3, index])` (split code 3: the detection splits use 0-2), so the output
does not depend on how parts are cut. Written here:

    images/NNNNNN.jpg      NNNNNN = image_id = index + 1; rows: file "images/NNNNNN.jpg",
                           offset = size = -1
    part-NNNNN.json        the generator's full record: per image its objects (category,
                           colour, box, named), background and caption (diagnostics, tests)

Real (webdataset / csv / parquet): the source is listed in order (image_id 1..N over every
key or row) and each image is decoded once to check it and record its size; a missing or
corrupt image, an empty or missing caption, a key without an image or a caption, a path that
leaves the image folder is a reject with its reason and the part goes on.

Without a `pairs:` block the stage plans zero parts and its manifest says `"pairs": 0`.
finalize() reports counts, caption lengths in words and, for generated pairs, how many objects
of base and of novel categories the captions name.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import canonical_hash, read_json
from ovdistill.pipeline.errors import reject
from ovdistill.pipeline.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb
from ovdistill.pipeline.manifests import ManifestError
from ovdistill.pipeline.pair_sources import (
    PAIRS_SCHEMA,
    PairEntry,
    list_pairs,
    pair_image_bytes,
    pair_image_root,
    read_pairs,
    source_fingerprint,
)
from ovdistill.pipeline.runner import Part, PartOutput, PartResult, StageContext, chunk_parts
from ovdistill.stages import synthetic
from ovdistill.stages.synthetic import PairSpec

NAME = layout.PAIRS
RESOURCES = {"num_cpus": 1}
# Bump when the drawing or caption code changes what a seed produces.
GENERATOR_VERSION = "pairs-1"
SPLIT_CODE = 3  # after stages/dataset.py SPLIT_CODES (train 0, val 1, captions 2)


@dataclass(frozen=True)
class Config:
    images_per_part: int = 250
    jpeg_quality: int = 92  # generated pairs
    max_pixels: int = DEFAULT_MAX_PIXELS  # real pairs: larger images are rejects


# ----------------------------------------------------------------------------- helpers


def pair_spec(ctx: StageContext) -> PairSpec | None:
    """The `pairs: synthetic:` block, validated; None for real pairs or no pairs block."""
    src = ctx.dataset.pairs
    if src is None or src.format != "synthetic":
        return None
    try:
        return PairSpec.from_dict(src.synthetic or {}, f"{ctx.dataset.path}: pairs.synthetic")
    except (TypeError, ValueError) as e:
        raise ManifestError(str(e)) from None


def vocabulary(ctx: StageContext) -> tuple[list[str], set[str]]:
    """(every category name, base and novel, in manifest order; the base names) of a
    generated pairs source: the generator must be able to draw each one."""
    names = synthetic.drawable_vocabulary(ctx.dataset, "generated pairs need", "pairs.synthetic")
    return names, set(ctx.dataset.base)


def item_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODE, index])


def image_file(image_id: int) -> str:
    """A generated pair image's file, relative to the pairs stage folder."""
    return f"{layout.PAIR_IMAGES}/{image_id:06d}.jpg"


def draw_pair(spec: PairSpec, names: list[str], index: int):
    """(scene, caption, named flags) of generated pair `index`: a pure function of them."""
    rng = item_rng(spec.seed, index)
    scene = synthetic.pair_scene(rng, spec, names)
    caption, named = synthetic.pair_caption(rng, scene.objects, scene.background, names,
                                            spec.name_prob)
    return scene, caption, named


def _encode_jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pairs_table(rows: list[dict]) -> pa.Table:
    """PAIRS_SCHEMA rows from dicts with its column names."""
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


# ----------------------------------------------------------------------------- protocol


def inputs(ctx: StageContext, cfg: Config) -> dict[str, str]:
    src = ctx.dataset.pairs
    if src is None:
        return {"pairs": "none"}
    spec = pair_spec(ctx)
    if spec is not None:
        names, base = vocabulary(ctx)
        return {"format": "synthetic", "spec": canonical_hash(asdict(spec)),
                "vocabulary": canonical_hash([names, sorted(base)]),
                "generator": GENERATOR_VERSION}
    return {"format": src.format, "source": source_fingerprint(src),
            "columns": f"{src.image_column},{src.caption_column}"}


def plan(ctx: StageContext, cfg: Config) -> list[Part]:
    src = ctx.dataset.pairs
    if src is None:
        return []
    spec = pair_spec(ctx)
    items = list(range(spec.n_images)) if spec is not None else list_pairs(src)
    return chunk_parts(items, cfg.images_per_part)


class Worker:
    def __init__(self, ctx: StageContext, cfg: Config):
        self.ctx, self.cfg = ctx, cfg
        self.spec = pair_spec(ctx)
        if self.spec is not None:
            self.names, _ = vocabulary(ctx)
        else:
            self.root = pair_image_root(ctx.dataset, ctx.files)

    def run_part(self, part: Part, out: PartOutput) -> PartResult:
        if self.spec is not None:
            return self._generate(part, out)
        return self._check(part, out)

    def _generate(self, part: Part, out: PartOutput) -> PartResult:
        rows, records = [], []
        for index in part.items:
            scene, caption, named = draw_pair(self.spec, self.names, index)
            iid = index + 1
            file = image_file(iid)
            out.tmp(file).write_bytes(_encode_jpeg(scene.image, self.cfg.jpeg_quality))
            w, h = scene.image.size
            rows.append({"image_id": iid, "caption": caption, "file": file, "offset": -1,
                         "size": -1, "width": w, "height": h})
            records.append({
                "image_id": iid, "file": file, "width": w, "height": h,
                "background": scene.background, "caption": caption,
                "objects": [{"category": o.category, "colour": o.colour,
                             "box": [round(v, 2) for v in o.box], "named": flag}
                            for o, flag in zip(scene.objects, named)],
            })
        pq.write_table(pairs_table(rows), out.tmp(f"{part.stem}.parquet"))
        with open(out.tmp(f"{part.stem}.json"), "w") as f:
            json.dump(records, f)
        return PartResult(rows=len(rows))

    def _check(self, part: Part, out: PartOutput) -> PartResult:
        rows, rejects = [], []
        for item in part.items:
            e = PairEntry(*item)
            problem = e.problem or _caption_problem(e.caption)
            reason = None if problem is None else f"{e.where}: {problem}"
            size = None
            if reason is None:
                try:
                    data = pair_image_bytes(self.root, e.file, e.offset, e.size)
                    size = decode_rgb(data, e.where, self.cfg.max_pixels).size
                except (ImageError, ManifestError) as err:
                    reason = str(err)
                except OSError as err:
                    reason = f"{e.where}: cannot read {e.file} ({err.strerror or err})"
            if reason is not None:
                rejects.append(reject(e.image_id, e.file, reason))
                continue
            rows.append({"image_id": e.image_id, "caption": e.caption, "file": e.file,
                         "offset": e.offset, "size": e.size, "width": size[0],
                         "height": size[1]})
        pq.write_table(pairs_table(rows), out.tmp(f"{part.stem}.parquet"))
        return PartResult(rows=len(rows), rejects=rejects)


def _caption_problem(caption: str | None) -> str | None:
    if caption is None:
        return "no caption"
    if not caption:
        return "empty caption"
    return None


def caption_words(captions: pa.Array | pa.ChunkedArray) -> dict:
    """{"min", "mean", "median", "max"} words per caption (whitespace-separated); {} if none."""
    if len(captions) == 0:
        return {}
    n = np.asarray(pc.list_value_length(pc.utf8_split_whitespace(captions)))
    return {"min": int(n.min()), "mean": round(float(n.mean()), 2),
            "median": float(np.median(n)), "max": int(n.max())}


def named_report(ctx: StageContext, stats: list[dict]) -> dict:
    """{"base": {"objects", "named", "fraction"}, "novel": {...}} over the generated pairs."""
    _, base = vocabulary(ctx)
    stage_dir = ctx.stage_dir(NAME)
    counts = {s: {"objects": 0, "named": 0} for s in ("base", "novel")}
    for s in sorted(stats, key=lambda s: s["part"]):
        for r in read_json(layout.part_file(stage_dir, s["part"], ".json")):
            for o in r["objects"]:
                c = counts["base" if o["category"] in base else "novel"]
                c["objects"] += 1
                c["named"] += int(o["named"])
    for c in counts.values():
        c["fraction"] = round(c["named"] / c["objects"], 4) if c["objects"] else None
    return counts


def finalize(ctx: StageContext, cfg: Config, stats: list[dict]) -> dict:
    src = ctx.dataset.pairs
    if src is None:
        return {"pairs": 0}
    table = read_pairs(ctx.files, columns=["caption"])
    out = {"pairs": table.num_rows, "rejects": sum(s["n_rejects"] for s in stats),
           "format": src.format, "caption_words": caption_words(table["caption"])}
    if src.format == "synthetic":
        out["named_objects"] = named_report(ctx, stats)
    return out
