"""The one typed config of a training run (`TrainConfig`), and how the CLI overrides it.

Defaults follow the ViLD paper where it fixes a number (tau, image-loss weight, RPN NMS and
top-k, final NMS, detections per image) and are otherwise sized for the embedded toy default on
2 CPU cores (small images, ResNet-18 FPN, 512-d box head).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ovdistill.pipeline.errors import OvdError
from ovdistill.pipeline.options import assignment
from ovdistill.pipeline.precision import PRECISIONS

MODES = ("text", "image", "vild", "grounding")
HEADS = ("shared", "separate")
NORMS = ("group", "batch")
PAIR_NEGATIVES = ("all", "unnamed")
GROUNDING_SPANS = ("all", "last", "eot")  # grounding_span


class ConfigError(OvdError, ValueError):
    """A config value is invalid; the message says which and why, in one line."""


@dataclass(frozen=True)
class TrainConfig:
    # what is trained
    mode: str = "vild"  # text: ViLD-text only | image: ViLD-image only | vild: both
    # | grounding: GLIP's detection as grounding (region-token alignment, focal loss)
    heads: str = "shared"  # separate: a text head and an image head (for ViLD-ensemble)
    # optimisation
    steps: int = 1500
    batch_size: int = 4  # images per process
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    # autocast of the network (backbone, heads); boxes, logits and losses stay float32.
    # auto: bf16 on CUDA, fp32 on CPU; bf16 works on CPU too. Resolved against the device.
    precision: str = "auto"
    # data and augmentation (sizes are the shortest image side in pixels)
    train_sizes: tuple[int, ...] = (192, 224, 256, 288, 320)  # scale jitter: one per image
    max_size: int = 512
    test_size: int = 256
    flip_prob: float = 0.5
    shuffle_buffer: int = 64
    num_workers: int | None = None  # DataLoader workers per process; None: 1 on the CPU,
    # data.loader_workers on CUDA (the node's cores shared by its ranks, less one, <= 8)
    cached_per_image: int = 300  # M: cached proposals used for the ViLD-image loss
    # model
    backbone: str = "resnet18"
    returned_layers: tuple[int, ...] = (1, 2, 3, 4)  # ResNet stages feeding the FPN
    norm: str = "group"  # group | batch (trainable; frozen BN would freeze an untrained net)
    trainable_backbone_layers: int = 5  # 5 = all (the backbone starts from scratch)
    # a checkpoint with backbone.* / rpn.* weights; "rpn" = <cache>/<ds>/rpn/rpn.pt. An RPN
    # stage checkpoint also sets backbone, returned_layers, anchor_sizes and norm to match.
    init_from: str | None = None
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)  # one per FPN level (+ pool)
    representation_size: int = 1024  # TwoMLPHead width
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    box_batch_size_per_image: int = 512  # live proposals sampled per image (as RoIHeads)
    box_positive_fraction: float = 0.25
    # RoIAlign samples per bin and axis. Its CPU backward is a serial scatter whose cost grows
    # with the square of this: 1 halves a toy training step on 2 cores.
    roi_sampling_ratio: int = 2
    # ViLD
    temperature: float = 0.01
    image_loss_weight: float = 0.5
    # remedies from later papers, all off by default (then every row is the paper's ViLD).
    # The distillation ones act on the cached proposals, i.e. in modes image and vild.
    distill_min_score: float = 0.0  # BARON: distil only cached proposals with RPN score >= this
    distill_top_k: int = 0  # object-centric OVD: at most this many per image (0 = all)
    contrastive_weight: float = 0.0  # BARON: symmetric InfoNCE student <-> teacher, in batch
    contrastive_tau: float = 0.07
    center_targets: bool = False  # modality gap: centre targets and texts by the region mean
    negative_prompts: bool = False  # generic negative texts in the ViLD-text softmax (training)
    # DetCLIPv2: image-text pairs (pairs_wds/ shards), all off by default. An iteration is a
    # pair iteration with probability pairs_ratio, drawn from (seed, step): a resumed run and
    # every DDP rank make the same choices. Pairs train at a lower resolution and a larger
    # batch; their loss is pairs_weight x the text-to-image contrastive loss on the set
    # similarity (max over the top-k regions, or softmax-weighted with pairs_soft_tau > 0).
    pairs_ratio: float = 0.0  # share of iterations on pairs (0 = off)
    pairs_batch_size: int = 8  # pair images per process
    pairs_sizes: tuple[int, ...] = (128,)  # shortest side of pair images (one per image)
    pairs_top_k: int = 100  # cached proposals per pair image, in the shard's objectness order
    pairs_tau: float = 0.05
    pairs_weight: float = 1.0
    pairs_soft_tau: float = 0.0  # 0: max over regions; > 0: the softmax-weighted variant
    # "all": DetCLIPv2's caption-level contrast, every other image a negative; "unnamed": the
    # contrast per phrase, an image whose own caption names the phrase not its negative
    # (losses.pair_phrase_contrastive_loss: false negatives of a small vocabulary)
    pairs_negatives: str = "all"
    # > 0: + pairs_weight x this x losses.pair_word_loss on pair iterations ("loss_pairs_word"):
    # inside each image, the region that best names a phrase must name it rather than the
    # batch's other phrases (the image-level contrast is met by colour alone, lab log 34)
    pairs_word_weight: float = 0.0
    # > 0: + pairs_weight x this x losses.pair_pseudo_loss ("loss_pairs_pseudo"): the word loss
    # on the teacher's pick, each phrase's kept box of the pseudo_boxes stage (lab log 70)
    pairs_pseudo_weight: float = 0.0
    # True: pair iterations run the backbone without a gradient, so the pair losses train the
    # text tower only and cannot move the features the image tower distils on (lab log 78)
    pairs_frozen_backbone: bool = False
    # DetCLIPv2's T_neg: up to this many non-base concepts of phrases/dictionary.parquet,
    # sampled per detection iteration, as extra (never-target) classes of the ViLD-text loss
    dictionary_negatives: int = 0
    # GLIP: detection as grounding (mode grounding), all unused in the other modes. A
    # detection image's prompt is its GT classes' names plus up to grounding_negatives other
    # base names, shuffled per (seed, step, image) and chunked to the teacher's context and
    # grounding_train_names (pipeline.prompts.detection_prompts). 8 for the 18-class toy (3
    # to 5 classes per image): about half the base vocabulary per prompt, one or two chunks
    # of a 32-token context; GLIP uses up to 85 of LVIS's. Token features: the cache's
    # teacher's text transformer (frozen unless train_text_encoder) -> a projection started
    # at its text_projection -> fusion_layers of X-MHA with the regions (0 = none) ->
    # alignment logits.
    grounding_negatives: int = 8
    # names per evaluation prompt (detect / evaluate): 1 scores each class in a prompt of its
    # own, so its token features never depend on which other names share its chunk; 0 packs
    # the vocabulary into as few prompts as the context holds (GLIP's chunks). The grounding
    # row's checkpoint on 200 TRAIN images, base AP50: 16.6 packed, 19.2 with 1 (lab log 43).
    # The cost: C prompts per image (fusion pads the regions to [C, N, D]); for LVIS's 1,203
    # classes 0 may be the affordable choice. A run saved before this key existed reads 1.
    grounding_eval_names: int = 1
    # names per training prompt of a detection image (0: as many as fit, GLIP's)
    grounding_train_names: int = 0
    # which tokens of a phrase are its positives in training and its score at inference:
    # "all" (GLIP's: every token, the score their mean sigmoid) or "last" (its last token
    # only). CLIP's text transformer is causal: in "red circle." and "red square." the token
    # "red" is the same feature, a positive of a red circle's region in one prompt and a
    # negative in the other; only a phrase's last token has seen the whole phrase. "eot":
    # with one phrase a prompt (grounding_train_names = grounding_eval_names = 1; a caption
    # becomes one prompt per phrase), the prompt's end-of-text token, the only token CLIP
    # trains to align with images (the toy teacher's zero-shot on val crops through its
    # text_projection: end-of-text 0.84 / 0.84 base / novel, last token 0.59 / 0.50).
    grounding_span: str = "all"
    fusion_layers: int = 0
    fusion_heads: int = 4  # must divide the embedding dim D
    train_text_encoder: bool = False  # the teacher's text tower trains too (saved in latest.pt)
    grounding_tau: float = 0.07  # initial temperature of the alignment logits (learned)
    text_bias: bool = False  # GLIP's text-conditioned bias beside the scalar one
    grounding_weight: float = 1.0  # weight of loss_grounding
    # iteration types beside detection (after the pair draw, from a draw of their own per
    # (seed, step)): a grounding-data iteration (the grounding split's captions as prompts)
    # with probability grounding_ratio, a pseudo-grounding one with pseudo_ratio
    grounding_ratio: float = 0.0
    pseudo_ratio: float = 0.0
    # inference
    final_nms: float = 0.5
    detections_per_image: int = 0  # 0: 100 for COCO-format datasets, 300 for LVIS
    score_thresh: float = 1e-3
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 100

    def validate(self) -> TrainConfig:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.heads not in HEADS:
            raise ConfigError(f"heads must be one of {HEADS}, got {self.heads!r}")
        if self.heads == "separate" and self.mode != "vild":
            raise ConfigError("heads=separate trains a text head and an image head; it needs "
                              f"mode=vild (got mode={self.mode!r})")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 or None (auto), got "
                              f"{self.num_workers}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be >= 1 (got {self.steps}, "
                              f"{self.batch_size})")
        if not self.train_sizes:
            raise ConfigError("train_sizes must name at least one size")
        if self.norm not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if len(self.anchor_sizes) != len(self.returned_layers) + 1:
            raise ConfigError(f"anchor_sizes needs one size per FPN level "
                              f"({len(self.returned_layers) + 1} for returned_layers="
                              f"{list(self.returned_layers)}), got {list(self.anchor_sizes)}")
        for key in ("image_loss_weight", "contrastive_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.distill_min_score <= 1.0:
            raise ConfigError(f"distill_min_score is an RPN score threshold in [0, 1], got "
                              f"{self.distill_min_score}")
        if self.distill_top_k < 0:
            raise ConfigError(f"distill_top_k must be >= 0 (0 = all), got {self.distill_top_k}")
        if self.contrastive_tau <= 0:
            raise ConfigError(f"contrastive_tau must be > 0, got {self.contrastive_tau}")
        self._validate_pairs()
        self._validate_grounding()
        return self

    def _validate_grounding(self) -> None:
        if self.grounding_span not in GROUNDING_SPANS:
            raise ConfigError(f"grounding_span must be one of {GROUNDING_SPANS}, got "
                              f"{self.grounding_span!r}")
        if self.grounding_span == "eot" and (self.grounding_train_names,
                                             self.grounding_eval_names) != (1, 1):
            raise ConfigError(f"grounding_span \"eot\" scores a prompt's end-of-text token, "
                              f"so each prompt holds one name: grounding_train_names and "
                              f"grounding_eval_names must be 1 (got "
                              f"{self.grounding_train_names}, {self.grounding_eval_names})")
        for key in ("grounding_eval_names", "grounding_train_names"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.grounding_negatives < 0:
            raise ConfigError(f"grounding_negatives must be >= 0, got {self.grounding_negatives}")
        if self.fusion_layers < 0 or self.fusion_heads < 1:
            raise ConfigError(f"fusion_layers must be >= 0 and fusion_heads >= 1, got "
                              f"{self.fusion_layers}, {self.fusion_heads}")
        if self.grounding_tau <= 0 or self.grounding_weight < 0:
            raise ConfigError(f"grounding_tau must be > 0 and grounding_weight >= 0, got "
                              f"{self.grounding_tau}, {self.grounding_weight}")
        for key in ("grounding_ratio", "pseudo_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} is a share of iterations, in [0, 1], got "
                                  f"{getattr(self, key)}")
        if self.grounding_ratio + self.pseudo_ratio > 1.0:
            raise ConfigError(f"grounding_ratio + pseudo_ratio must be <= 1, got "
                              f"{self.grounding_ratio + self.pseudo_ratio:g}")
        grounding_only = {"grounding_ratio": self.grounding_ratio > 0,
                          "pseudo_ratio": self.pseudo_ratio > 0,
                          "fusion_layers": self.fusion_layers > 0,
                          "train_text_encoder": self.train_text_encoder,
                          "text_bias": self.text_bias,
                          "grounding_span": self.grounding_span != "all"}
        used = [k for k, on in grounding_only.items() if on]
        if used and self.mode != "grounding":
            raise ConfigError(f"{used[0]} is a GLIP option; it needs mode=grounding (got "
                              f"mode={self.mode!r})")
        if self.mode == "grounding" and self.dictionary_negatives > 0:
            raise ConfigError("dictionary_negatives are ViLD-text negatives; mode grounding "
                              "uses grounding_negatives")

    def _validate_pairs(self) -> None:
        if not 0.0 <= self.pairs_ratio <= 1.0:
            raise ConfigError(f"pairs_ratio is the share of pair iterations, in [0, 1], got "
                              f"{self.pairs_ratio}")
        if self.pairs_batch_size < 2:
            raise ConfigError(f"pairs_batch_size must be >= 2 (the other images of the batch "
                              f"are the negatives), got {self.pairs_batch_size}")
        if not self.pairs_sizes or min(self.pairs_sizes) < 1:
            raise ConfigError(f"pairs_sizes must name at least one size >= 1, got "
                              f"{list(self.pairs_sizes)}")
        if self.pairs_top_k < 1:
            raise ConfigError(f"pairs_top_k must be >= 1, got {self.pairs_top_k}")
        if self.pairs_tau <= 0:
            raise ConfigError(f"pairs_tau must be > 0, got {self.pairs_tau}")
        if self.pairs_negatives not in PAIR_NEGATIVES:
            raise ConfigError(f"pairs_negatives must be one of {PAIR_NEGATIVES}, got "
                              f"{self.pairs_negatives!r}")
        for key in ("pairs_weight", "pairs_soft_tau", "pairs_word_weight", "pairs_pseudo_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("pairs_word_weight", "pairs_pseudo_weight"):
            if getattr(self, key) > 0 and self.pairs_ratio <= 0:
                raise ConfigError(f"{key} > 0 acts on pair iterations: set pairs_ratio > 0 "
                                  f"(it is 0)")
        if self.pairs_frozen_backbone and self.pairs_ratio <= 0:
            raise ConfigError("pairs_frozen_backbone acts on pair iterations: set pairs_ratio "
                              "> 0 (it is 0)")
        if self.dictionary_negatives < 0:
            raise ConfigError(f"dictionary_negatives must be >= 0 (0 = off), got "
                              f"{self.dictionary_negatives}")
        if self.dictionary_negatives > 0 and self.mode == "image":
            raise ConfigError("dictionary_negatives are negatives of the ViLD-text loss; mode "
                              "image has none (use mode text or vild)")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def detections_per_image(cfg: TrainConfig, dataset_format: str) -> int:
    """The paper's cap on final detections: 300 per image for LVIS, 100 for COCO."""
    if cfg.detections_per_image > 0:
        return cfg.detections_per_image
    return 300 if dataset_format == "lvis" else 100


def _coerce(field: dataclasses.Field, value: Any, key: str) -> Any:
    default = field.default
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(int(v) for v in value)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and not isinstance(value, bool):
        if not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    return value


def make_config(overrides: dict[str, Any] | None = None, base: TrainConfig | None = None
                ) -> TrainConfig:
    """`base` (default: TrainConfig()) with `overrides`; unknown keys are refused."""
    base = base or TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown train config key(s) {unknown}; known: {sorted(fields)}")
    typed = {k: _coerce(fields[k], v, k) for k, v in overrides.items()}
    return dataclasses.replace(base, **typed).validate()


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`["lr=1e-3", "train_sizes=[128,160]"]` -> {"lr": 0.001, "train_sizes": [128, 160]}."""
    out = {}
    for pair in pairs:
        key, value = assignment(pair, "KEY=VALUE", ConfigError)
        out[key.strip()] = value
    return out


def config_from_dict(d: dict) -> TrainConfig:
    """Rebuild a config saved in a checkpoint (lists back to tuples)."""
    return make_config(d)
