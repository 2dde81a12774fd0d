"""Where a trained model puts each caption phrase of the image-text pairs: the region the
pairs loss would pick (the max of `losses.pair_set_similarity`), scored against the pairs'
answer key, and drawn.

    python -m ovdistill.trainer.pair_probe --manifest M --cache C --run R [--images 200]
        -> R/pair_probe.json, R/pairs_phrases.png (with --pictures)

For every pair (first `--images` of `pairs_wds/`, in shard order) the run's model embeds the
pair's cached proposals at the pairs' training size (`pairs_sizes[0]`) with the head the
classifier uses; each phrase picks the proposal of highest cosine. With an answer key
(generated pairs: the `pairs` stage's own records, `pairs/part-NNNNN.json`, which hold every
object's box and category; never read by training), a pick is a hit when its IoU with an
object of the phrase's category is >= `--iou`. Reported per phrase split (base, novel):

    hit      share of phrases whose pick is a hit
    reach    share whose top-k proposals hold any hit at all (the ceiling of `hit`)
    chance   mean share of a pair's proposals that would be a hit (a random pick)

A model trained with pairs should lift novel `hit` above the same row without them; a pick on
a neighbouring base object is the failure to look for in the picture (phrase labels in blue
for base, orange for novel; the caption above each panel).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.pipeline.precision import resolve_device
from ovdistill.trainer.data import resize_for_test
from ovdistill.trainer.evaluate import load_run
from ovdistill.trainer.pair_data import EmptyPair, decode_pair, pair_shard_urls
from ovdistill.trainer.pictures import BASE_COLOUR, NOVEL_COLOUR, Box, grid, panel, with_header
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

PROBE_FILE = "pair_probe.json"
PICTURE_FILE = "pairs_phrases.png"
PICTURE_PAIRS = 8


def answer_key(cache: DatasetCache) -> dict[int, list[tuple[str, list[float]]]]:
    """{pair image_id: [(category name, box x1 y1 x2 y2), ...]} from the generated pairs'
    records; {} when the pairs are not generated (a real source has no boxes)."""
    key = {}
    for part in cache.parts(layout.PAIRS):  # each part's records sit beside its rows
        path = part.with_suffix(".json")
        if not path.is_file():
            continue
        for record in read_json(path):
            key[int(record["image_id"])] = [(o["category"], [float(v) for v in o["box"]])
                                            for o in record["objects"]]
    return key


def phrase_picks(region_emb: Tensor, phrase_emb: Tensor) -> Tensor:
    """The proposal each phrase picks. region_emb: Tensor[K, D], phrase_emb: Tensor[P, D], both
    L2-normalised -> Tensor[P] int64 (argmax of the cosine over K)."""
    return (phrase_emb @ region_emb.T).argmax(dim=1)


def score_picks(boxes: Tensor, picks: Tensor, phrases: list[str],
                objects: list[tuple[str, list[float]]], iou: float) -> list[dict]:
    """One record per phrase whose category is in the image: {"phrase", "hit", "reach",
    "chance"}. boxes: Tensor[K, 4] the pair's proposals (original pixels), picks: Tensor[P]."""
    out = []
    for phrase, pick in zip(phrases, picks.tolist()):
        gt = [box for name, box in objects if name == phrase]
        if not gt:
            continue  # a phrase naming nothing drawn (cannot happen for generated captions)
        good = (box_iou(boxes, torch.tensor(gt, dtype=torch.float32)) >= iou).any(dim=1)
        out.append({"phrase": phrase, "hit": bool(good[pick]), "reach": bool(good.any()),
                    "chance": float(good.float().mean())})
    return out


def summarise(records: list[dict], split_of: dict[str, str]) -> dict:
    """{"base": {"phrases", "hit", "reach", "chance"}, "novel": {...}} over `records`."""
    out = {}
    for which in ("base", "novel"):
        rows = [r for r in records if split_of.get(r["phrase"]) == which]
        n = len(rows)
        out[which] = {"phrases": n, **{k: (round(sum(r[k] for r in rows) / n, 4) if n else None)
                                        for k in ("hit", "reach", "chance")}}
    return out


def probe(model, urls: list[str], key: dict, split_of: dict[str, str], size: int,
          max_size: int, top_k: int, iou: float, max_images: int, device: torch.device,
          keep_pictures: int = 0) -> tuple[dict, list]:
    """(summary, up to `keep_pictures` (image, boxes, picks, phrases, caption) for drawing)."""
    import webdataset as wds

    records, pictures, n = [], [], 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        try:
            pair = decode_pair(sample, model.embed_dim, top_k)
        except EmptyPair:
            continue
        image, scale = resize_for_test(pair["image"], size, max_size)
        with torch.no_grad():
            region = model.pair_region_embeddings([image.to(device)],
                                                  [(pair["boxes"] * scale).to(device)])[0]
        phrases = model._center(F.normalize(pair["phrase_emb"].float().to(device), dim=-1))
        picks = phrase_picks(region.float(), phrases).cpu()
        records += score_picks(pair["boxes"], picks, pair["phrases"],
                               key.get(pair["image_id"], []), iou)
        if len(pictures) < keep_pictures:
            caption = json.loads(sample["phrases.json"]).get("caption", "")
            pictures.append((pair["image"], pair["boxes"], picks, pair["phrases"], caption))
        n += 1
        if n >= max_images:
            break
    return {"pairs": n, "iou": iou, **summarise(records, split_of)}, pictures


def draw(pictures: list, split_of: dict[str, str]) -> Image.Image:
    """A contact sheet: each pair with every phrase's pick, labelled with the phrase."""
    from torchvision.transforms.functional import to_pil_image

    panels = []
    for image, boxes, picks, phrases, caption in pictures:
        drawn = [Box(tuple(boxes[p].tolist()), phrase,
                     NOVEL_COLOUR if split_of.get(phrase) == "novel" else BASE_COLOUR)
                 for phrase, p in zip(phrases, picks.tolist())]
        panels.append(panel(to_pil_image(image), drawn, title=caption[:52]))
    return with_header(grid(panels, cols=4), "each caption phrase's pick (its best region)",
                       [(BASE_COLOUR, "base phrase"), (NOVEL_COLOUR, "novel phrase")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.pair_probe",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p, device=True)
    p.add_argument("--run", required=True, help="a training run folder (its latest.pt)")
    p.add_argument("--images", type=int, default=200, help="pairs to probe")
    p.add_argument("--iou", type=float, default=0.5)
    p.add_argument("--pictures", action="store_true", help=f"also <run>/{PICTURE_FILE}")
    args = p.parse_args(argv)
    try:
        dataset = load_manifest(args.manifest, cache_root=args.cache)
        cache_dir = Path(args.cache) / dataset.name
        device = torch.device(resolve_device(args.device))
        model, _, _ = load_run(Path(args.run) / "latest.pt", dataset, cache_dir, device)
        split_of = {c.name: c.split for c in dataset.categories()}
        cfg = model.cfg
        summary, pictures = probe(
            model, pair_shard_urls(cache_dir), answer_key(DatasetCache(cache_dir)), split_of,
            cfg.pairs_sizes[0], cfg.max_size, cfg.pairs_top_k, args.iou, args.images, device,
            PICTURE_PAIRS if args.pictures else 0)
    except OvdError as e:
        return report(e)
    summary["run"] = str(args.run)
    (Path(args.run) / PROBE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"phrase picks on {summary['pairs']} pairs (IoU >= {args.iou}):")
    for which in ("base", "novel"):
        s = summary[which]
        if s["phrases"]:
            print(f"  {which:<5} {s['phrases']:>5} phrases: hit {s['hit']:.3f}  "
                  f"reach {s['reach']:.3f}  chance {s['chance']:.3f}")
    if pictures:
        draw(pictures, split_of).save(Path(args.run) / PICTURE_FILE)
        print(f"picture: {Path(args.run) / PICTURE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
