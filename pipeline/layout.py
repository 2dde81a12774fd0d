"""The cache's layout: the one place that names every folder and file under
`<cache>/<dataset>/`, and reads a stage's `_MANIFEST.json`.

    <cache>/<dataset>/
      dataset/     images, <split>.json, train_full.json (synthetic), captions.csv
      teacher/     the CLIP teacher's identity (and its checkpoint when trained here)
      rpn/         rpn.pt
      proposals/   part-NNNNN.parquet: the RPN's boxes per image
      regions/     part-NNNNN.parquet: the teacher's embedding of each box
      text/        <dataset>.parquet, negatives.parquet, region_mean.npy
      wds/         train-NNNNNN.tar (members SHARD_MEMBERS), sizes.json
      index/       regions.faiss, ids.parquet
      pairs/       part-NNNNN.parquet: image-text pairs (no boxes); images/ when generated
      grounding/   grounding.json (MDETR format) and images/ when generated; part-NNNNN.json
      phrases/     part-NNNNN.parquet: noun phrases and their embeddings per pair image,
                   dictionary.parquet (the concept dictionary's embeddings)
      pair_proposals/ part-NNNNN.parquet: the RPN's boxes per pair image (proposals schema)
      pair_regions/ part-NNNNN.parquet: the teacher's embedding of each pair proposal (regions
                   schema, the top_k first by rank)
      pseudo_boxes/ pseudo_grounding.json (MDETR format: per phrase its best-matching pair
                   proposal above a threshold); part-NNNNN.parquet: every phrase's best match
      pairs_wds/   pairs-NNNNNN.tar (members PAIR_MEMBERS), sizes.json
    and in every stage folder: _PLAN.json, part-NNNNN.stats.json, _MANIFEST.json

Stages, the trainer, query and bench all name these files through this module; it imports
nothing of the project but the cache helpers and the errors.
"""
from __future__ import annotations

from pathlib import Path

from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import StageError

# stage folders, in the order the stages run
DATASET = "dataset"
TEACHER = "teacher"
RPN = "rpn"
PROPOSALS = "proposals"
REGIONS = "regions"
TEXT = "text"
WDS = "wds"  # the pack stage's folder: the contract's shards
INDEX = "index"
PAIRS = "pairs"  # image-text pairs without boxes (DetCLIPv2)
GROUNDING = "grounding"  # captions whose phrases point at boxes (GLIP, MDETR's format)
PHRASES = "phrases"
PAIR_PROPOSALS = "pair_proposals"
PAIR_REGIONS = "pair_regions"  # the teacher's region embeddings of the pair proposals
PSEUDO_BOXES = "pseudo_boxes"  # GLIP's pseudo-grounding of the pairs, from the cache
PAIRS_WDS = "pairs_wds"  # the pair_pack stage's folder (its own: a pack rebuild keeps it)
STAGE_FOLDERS = (DATASET, PAIRS, GROUNDING, TEACHER, RPN, PROPOSALS, REGIONS, TEXT, PHRASES,
                 PAIR_PROPOSALS, PAIR_REGIONS, PSEUDO_BOXES, WDS, PAIRS_WDS, INDEX)

# every stage folder
PLAN_FILE = "_PLAN.json"
MANIFEST_FILE = "_MANIFEST.json"
LOCK_FILE = ".lock"  # in <cache>/<dataset>/
PART_GLOB = "part-*.parquet"
STATS_GLOB = "part-*.stats.json"

# stage-own files
TRAIN_FULL = "train_full.json"  # dataset (synthetic): train images with novel boxes too
CAPTIONS_CSV = "captions.csv"  # dataset: image-caption pairs of the teacher's training
RPN_CHECKPOINT = "rpn.pt"
NEGATIVES_FILE = "negatives.parquet"
REGION_MEAN_FILE = "region_mean.npy"
SIZES_FILE = "sizes.json"  # wds: each sample's size in bytes
SHARD_GLOB = "train-*.tar"
INDEX_FILE = "regions.faiss"
IDS_FILE = "ids.parquet"
PAIR_IMAGES = "images"  # pairs (generated): the pair images, in the pairs folder
DICTIONARY_FILE = "dictionary.parquet"  # phrases: concept name, embedding, split
PAIR_SHARD_GLOB = "pairs-*.tar"
GROUNDING_FILE = "grounding.json"  # grounding (generated): the MDETR-format annotation file
GROUNDING_IMAGES = "images"  # grounding (generated): its images, in the grounding folder
PSEUDO_FILE = "pseudo_grounding.json"  # pseudo_boxes: the pseudo-grounding (MDETR format)

# a shard sample's members (webdataset keys); the pack stage hashes " ".join(SHARD_MEMBERS)
SHARD_MEMBERS = ("jpg", "boxes.npy", "scores.npy", "emb.npy", "json")
REQUIRED_MEMBERS = ("jpg", "boxes.npy", "emb.npy", "json")  # scores.npy is optional
# a pair shard sample's members; `.phrases.json` = {"image_id", "width", "height", "caption",
# "phrases": [str, ...]}, `.phrase_emb.npy` float16[P, D] in that phrase order
PAIR_MEMBERS = ("jpg", "boxes.npy", "scores.npy", "phrases.json", "phrase_emb.npy")


def part_stem(index: int) -> str:
    return f"part-{index:05d}"


def part_file(stage_dir: Path, index: int, suffix: str = ".parquet") -> Path:
    return Path(stage_dir) / f"{part_stem(index)}{suffix}"


def stats_file(stage_dir: Path, stem: str) -> Path:
    return Path(stage_dir) / f"{stem}.stats.json"


def shard_name(index: int) -> str:
    return f"train-{index:06d}.tar"


def pair_shard_name(index: int) -> str:
    return f"pairs-{index:06d}.tar"


def text_file(dataset: str) -> str:
    """The text stage's class embeddings of `dataset`, in the text folder."""
    return f"{dataset}.parquet"


def recorded_checkpoint(stage_dir: Path, manifest: dict) -> Path:
    """The RPN file a finished rpn manifest names: a trained one is recorded by its name in the
    stage folder (so a moved or copied cache still finds it), a given one by its path."""
    return Path(stage_dir) / manifest["checkpoint"]  # an absolute path stays as it is


class DatasetCache:
    """The cache of one dataset, `<cache root>/<dataset name>`: its folders and files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def manifest_path(self, name: str) -> Path:
        return self.stage_dir(name) / MANIFEST_FILE

    def read_manifest(self, name: str, required: bool = True) -> dict | None:
        """The finished `_MANIFEST.json` of stage folder `name`; missing: a clear StageError,
        or None when not `required`."""
        path = self.manifest_path(name)
        if not path.exists():
            if not required:
                return None
            raise StageError(
                f"stage '{name}' has not finished: {path} is missing; "
                f"run `python -m ovdistill run --stages {name}` first"
            )
        return read_json(path)

    def parts(self, name: str) -> list[Path]:
        """The part Parquet files of stage folder `name`, in part order."""
        return sorted(self.stage_dir(name).glob(PART_GLOB))

    def text_parquet(self, dataset: str) -> Path:
        return self.stage_dir(TEXT) / text_file(dataset)

    def region_mean(self) -> Path:
        return self.stage_dir(TEXT) / REGION_MEAN_FILE

    def negatives(self) -> Path:
        return self.stage_dir(TEXT) / NEGATIVES_FILE

    def shards_dir(self) -> Path:
        return self.stage_dir(WDS)

    def shards(self) -> list[Path]:
        return sorted(self.shards_dir().glob(SHARD_GLOB))

    def pair_shards_dir(self) -> Path:
        return self.stage_dir(PAIRS_WDS)

    def pair_shards(self) -> list[Path]:
        return sorted(self.pair_shards_dir().glob(PAIR_SHARD_GLOB))

    def dictionary(self) -> Path:
        return self.stage_dir(PHRASES) / DICTIONARY_FILE

    def pseudo_grounding(self) -> Path:
        return self.stage_dir(PSEUDO_BOXES) / PSEUDO_FILE

    def train_full(self) -> Path:
        return self.stage_dir(DATASET) / TRAIN_FULL

    def rpn_checkpoint(self) -> Path:
        """The RPN checkpoint the finished rpn manifest names."""
        return recorded_checkpoint(self.stage_dir(RPN), self.read_manifest(RPN))
