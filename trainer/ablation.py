"""`python -m ovdistill.trainer.ablation`: the ViLD paper's central ablation, and the published remedies
for a collapsed student, as one table on one manifest.

Every row trains with the same steps and seed (the manifest's `trainer:` block, then --steps /
--seed / --set) into <out>/<row>/ and is evaluated there (`python -m ovdistill.trainer.evaluate`):

    text         --mode text                            ViLD-text
    image        --mode image                           ViLD-image
    vild         --mode vild                            ViLD (one shared head)
    ensemble     --mode vild --heads separate           ViLD-ensemble (evaluated with --ensemble)
    confident    vild + distill only confident proposals (REMEDIES below)
    contrastive  vild + a contrastive distillation term
    centered     vild + targets and texts with the teacher's mean direction taken out
    negatives    vild + negative prompts in the text loss
    calibrated   the vild row's checkpoint, no training of its own, evaluated with
                 --calibration mean_logit (per-class mean logit over unlabeled train images,
                 centred over the classes)
    ensemble_residual
                 ensemble + centered + contrastive: the image head made to carry the
                 region-specific residual of the teacher (the ensemble's image head reaches
                 cosine 0.84 to its teacher but names only 0.26 of the objects right)
    ensemble_confident
                 ensemble_residual + confident: the ensemble never reads the image head's
                 background (its softmax is over the classes), so the image head is
                 distilled on object-like proposals only
    pairs        --mode text + image-text pairs (PAIRS below): DetCLIPv2 without
                 distillation, detection on base boxes plus the word-region contrastive loss
                 on captioned images (the only source of novel names here is the captions)
    vild+pairs   --mode vild + the same pairs: ViLD's distillation and DetCLIPv2's pairs
    ensemble+pairs
                 ensemble_residual + the same pairs, each phrase contrasted only against the
                 images whose caption does not name it (pairs_negatives "unnamed"): the pairs
                 on the best distillation row, their text-to-image loss in the text head
    ensemble+pairs_frozen
                 ensemble+pairs with the pseudo-box term (pairs_pseudo_weight 1), a third of
                 the iterations on pairs, the pair iterations on a frozen backbone
                 (pairs_frozen_backbone) and ON TOP of the other rows' steps (1,000 detection
                 steps -> 1,500 in all), so it keeps ensemble_residual's detection budget
    grounding    --mode grounding (GLIP): detection as grounding on base boxes (class-name
                 prompts, region-token alignment, focal loss) + the grounding split's
                 captions (GROUNDING below), no fusion; evaluated by its alignment scores
    grounding+fusion
                 grounding + one layer of language-aware deep fusion (X-MHA)
    grounding+pseudo
                 grounding + pseudo-grounding iterations on the pair images (the
                 pseudo_boxes stage's file)

`--rows text,vild` (make ablation ROWS=text,vild) runs a subset; the default is every row.
A row whose eval file exists is finished and skipped; a row whose training stopped resumes
(`--resume latest`); `calibrated` runs the vild row first when that is not finished. The
teacher's own ceiling, `python -m ovdistill.trainer.oracle`, runs once into <out>/oracle/.

The summary, <out>/ablation.md and <out>/ablation.json, holds every finished row found on disk,
whichever rows this invocation ran:

    {"steps", "seed", "teacher": {"base_acc", "novel_acc"}, "oracle": {"AP50_base",
     "AP50_novel"}, "rows": [{"name", "mode", "heads", "options", "AP50_base", "AP50_novel",
     "AP50_all", "image_fit", "train_seconds"}], "targets": {"T1", "T2", "T3"}}

AP values are fractions in [0, 1]. "image fit" is the final loss_image over the loss of
predicting the teacher's mean direction (1.0: nothing region-specific learned); "top class" is
the share of the val detections taken by the most frequent class (1 / C when balanced).
Targets (met: true / false; null when a number they need is missing):
    T1  vild novel AP50 >= 1.5 x text novel AP50 and vild base AP50 >= 0.8 x text base AP50
    T2  the best row's novel AP50 >= 0.6 x the oracle's novel AP50
    T3  teacher zero-shot base and novel accuracy >= 0.85, no category below 0.50
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ovdistill.pipeline.cache import read_json
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.layout import MANIFEST_FILE, TEACHER, DatasetCache
from ovdistill.pipeline.manifests import ManifestError, load_manifest
from ovdistill.pipeline.options import add_data_options
from ovdistill.trainer.config import ConfigError, TrainConfig, parse_set
from ovdistill.trainer.evaluate import result_suffix

# The remedies' settings (TrainConfig keys, passed as --set KEY=VALUE). The `confident`
# numbers are placeholders to tune.
REMEDIES: dict[str, dict] = {
    # the smallest set that keeps >= 0.95 of the base objects covered (a kept proposal at IoU
    # >= 0.5) on 200 held-out train images: 12 proposals an image instead of 100 (BENCHMARKS)
    "confident": {"distill_min_score": 0.3, "distill_top_k": 20},
    "contrastive": {"contrastive_weight": 1.0},
    "centered": {"center_targets": True},
    "negatives": {"negative_prompts": True},
}
# DetCLIPv2's image-text pairs (TrainConfig keys), shared by the `pairs` and `vild+pairs`
# rows: half the iterations on pairs (the pairs_* defaults: batch 8 at 128 px, top 100
# proposals, tau 0.05, hard max over regions)
PAIRS: dict = {"pairs_ratio": 0.5, "pairs_weight": 0.1, "pairs_top_k": 10}  # lab log 30, 32
# GLIP's rows (TrainConfig keys): a quarter of the iterations on the grounding split, the
# rest detection as grounding with one class name per prompt, each phrase trained and scored
# by its prompt's end-of-text token (chosen on 200 train images, base AP50: packed prompts
# 19.2, one name per prompt 20.9, its last token 30.2, the end-of-text token 33.3; lab logs
# 48, 51, 57); grounding+pseudo gives another quarter to pseudo-grounding
GROUNDING: dict = {"grounding_ratio": 0.25, "grounding_train_names": 1,
                   "grounding_span": "eot"}
PSEUDO: dict = {"pseudo_ratio": 0.25}
# ensemble+pairs_frozen: the pairs that leave the distilled features alone (lab logs 76, 78)
PAIRS_FROZEN: dict = {"pairs_ratio": 0.3333, "pairs_weight": 0.1, "pairs_top_k": 10,
                      "pairs_negatives": "unnamed", "pairs_pseudo_weight": 1.0,
                      "pairs_frozen_backbone": True}
CALIBRATION = "mean_logit"  # the `calibrated` row's `trainer.evaluate --calibration`

T1_NOVEL_RATIO = 1.5  # vild novel AP50 against text novel AP50
T1_BASE_RATIO = 0.8  # vild base AP50 against text base AP50
T2_ORACLE_RATIO = 0.6  # the best row's novel AP50 against the oracle's
T3_ACCURACY = 0.85  # teacher zero-shot accuracy, base and novel
T3_CATEGORY_FLOOR = 0.50  # teacher zero-shot accuracy of every category

ORACLE_DIR = "oracle"
TRAIN_TIME = "train_time.json"  # <row>/: wall seconds of its trainings, summed over resumes


@dataclass(frozen=True)
class Row:
    name: str
    mode: str
    heads: str = "shared"
    options: dict = field(default_factory=dict)  # TrainConfig overrides (--set)
    ensemble: bool = False  # evaluated with --ensemble
    calibration: str | None = None  # evaluated with --calibration
    reuses: str | None = None  # evaluates this row's checkpoint instead of training
    # its pair iterations come on top of the other rows' steps: it trains
    # round(steps / (1 - pairs_ratio)) in all, so about `steps` of them are detection steps
    detection_budget: bool = False


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("text", "text"),
    Row("image", "image"),
    Row("vild", "vild"),
    Row("ensemble", "vild", "separate", ensemble=True),
    *(Row(name, "vild", options=opts) for name, opts in REMEDIES.items()),
    Row("calibrated", "vild", calibration=CALIBRATION, reuses="vild"),
    Row("ensemble_residual", "vild", "separate", ensemble=True,
        options={**REMEDIES["centered"], **REMEDIES["contrastive"]}),
    Row("ensemble_confident", "vild", "separate", ensemble=True,
        options={**REMEDIES["centered"], **REMEDIES["contrastive"], **REMEDIES["confident"]}),
    Row("pairs", "text", options=PAIRS),  # detection on base boxes + pairs, no distillation
    Row("vild+pairs", "vild", options=PAIRS),  # ViLD + pairs
    Row("ensemble+pairs", "vild", "separate", ensemble=True,
        options={**REMEDIES["centered"], **REMEDIES["contrastive"], **PAIRS,
                 "pairs_negatives": "unnamed"}),
    Row("ensemble+pairs_frozen", "vild", "separate", ensemble=True, detection_budget=True,
        options={**REMEDIES["centered"], **REMEDIES["contrastive"], **PAIRS_FROZEN}),
    Row("grounding", "grounding", options=GROUNDING),  # GLIP, no fusion
    Row("grounding+fusion", "grounding", options={**GROUNDING, "fusion_layers": 1}),
    Row("grounding+pseudo", "grounding", options={**GROUNDING, **PSEUDO}),
)}


def row_eval_file(run: Path, row: Row) -> Path:
    return Path(run) / f"eval{result_suffix(row.ensemble, False, row.calibration)}.json"


def set_args(options: dict) -> list[str]:
    """{"center_targets": True} -> ["--set", "center_targets=true"]."""
    return [a for k, v in options.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def image_fit(run: Path, last: int = 5) -> float | None:
    """loss_image over the mean-direction baseline (`losses.mean_direction_baseline`), both
    averaged over the last `last` rows of metrics.jsonl: near 1 means the student learned
    only the teacher's common direction. None when the run has no image loss."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss_image" in r and r.get("image_mean_baseline")][-last:]
    if not rows:
        return None
    return round(sum(r["loss_image"] for r in rows) / sum(r["image_mean_baseline"]
                                                          for r in rows), 3)


# ----------------------------------------------------------------------------- running


def _add_train_time(run: Path, seconds: float) -> None:
    path = run / TRAIN_TIME
    total = read_json(path)["seconds"] if path.is_file() else 0.0
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": round(total + seconds, 1)}) + "\n")


def base_steps(args) -> int:
    """The steps every row trains: --steps, else a --set steps=N, else the manifest's
    `trainer:` block's, else TrainConfig's default."""
    if args.steps:
        return int(args.steps)
    sets = parse_set(args.set)
    if "steps" in sets:
        return int(sets["steps"])
    trainer = load_manifest(args.manifest, cache_root=args.cache).trainer or {}
    return int(trainer.get("steps", TrainConfig.steps))


def row_steps(row: Row, steps: int) -> int:
    """The total steps of `row` when the other rows train `steps`."""
    if not row.detection_budget:
        return steps
    return round(steps / (1.0 - row.options["pairs_ratio"]))


def train_command(row: Row, args) -> list[str]:
    run = Path(args.out) / row.name
    cmd = [sys.executable, "-m", "ovdistill.trainer.train", "--manifest", args.manifest,
           "--cache", args.cache, "--out", str(run), "--mode", row.mode]
    cmd += ["--heads", row.heads] if row.heads != "shared" else []
    if row.detection_budget:
        cmd += [f"--steps={row_steps(row, base_steps(args))}"]
    else:
        cmd += [f"--steps={args.steps}"] if args.steps else []
    cmd += [f"--seed={args.seed}"] if args.seed is not None else []
    for kv in args.set:
        cmd += ["--set", kv]
    cmd += set_args(row.options)
    if (run / "latest.pt").is_file():
        cmd += ["--resume", "latest"]
    return cmd


def eval_command(row: Row, args) -> list[str]:
    out = Path(args.out)
    cmd = [sys.executable, "-m", "ovdistill.trainer.evaluate", "--manifest", args.manifest,
           "--cache", args.cache, "--run", str(out / row.name)]
    if row.reuses:
        cmd += ["--checkpoint", str(out / row.reuses / "latest.pt")]
    cmd += ["--ensemble"] if row.ensemble else []
    cmd += ["--calibration", row.calibration] if row.calibration else []
    return cmd


def run_row(row: Row, args, log=print) -> Path:
    """Train (or resume) and evaluate one row unless it is finished -> its eval file."""
    run = Path(args.out) / row.name
    result_file = row_eval_file(run, row)
    if result_file.is_file():
        log(f"[{row.name}] already evaluated: {result_file}")
        return result_file
    if row.reuses:
        log(f"[{row.name}] evaluates the {row.reuses} row's checkpoint")
        run_row(ROWS[row.reuses], args, log)
    else:
        cmd = train_command(row, args)
        log(f"[{row.name}] {' '.join(cmd)}")
        t0 = time.time()
        try:
            subprocess.run(cmd, check=True)
        finally:
            _add_train_time(run, time.time() - t0)
    cmd = eval_command(row, args)
    log(f"[{row.name}] {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    keep_detections(run, row)
    return result_file


def keep_detections(run: Path, row: Row) -> None:
    """Every row folder holds its val detections as detections_val.json: an ensemble or
    calibrated evaluation names its file with a suffix, so it is copied to that name too."""
    suffix = result_suffix(row.ensemble, False, row.calibration)
    written = Path(run) / f"detections_val{suffix}.json"
    if suffix and written.is_file():
        shutil.copyfile(written, Path(run) / "detections_val.json")


def run_oracle(args, log=print) -> Path:
    out = Path(args.out) / ORACLE_DIR
    path = out / "oracle.json"
    if path.is_file():
        log(f"[oracle] already evaluated: {path}")
        return path
    cmd = [sys.executable, "-m", "ovdistill.trainer.oracle", "--manifest", args.manifest,
           "--cache", args.cache, "--out", str(out)]
    log(f"[oracle] {' '.join(cmd)}")
    subprocess.run(cmd, check=True)
    return path


# ----------------------------------------------------------------------------- summary


def finished_rows(out: Path) -> list[tuple[dict, dict]]:
    """(ablation.json row, its eval file's content) for every finished row under `out`, in
    the order of ROWS."""
    found = []
    for row in ROWS.values():
        run = out / row.name
        path = row_eval_file(run, row)
        if not path.is_file():
            continue
        result = read_json(path)
        trained = out / (row.reuses or row.name)
        seconds = None
        if not row.reuses:
            seconds = (read_json(run / TRAIN_TIME)["seconds"] if (run / TRAIN_TIME).is_file()
                       else result.get("train_seconds"))
        found.append(({"name": row.name, "mode": row.mode, "heads": row.heads,
                       "options": dict(row.options),
                       "AP50_base": result.get("AP50_base"),
                       "AP50_novel": result.get("AP50_novel"),
                       "AP50_all": result.get("AP50_all"),
                       "image_fit": image_fit(trained), "train_seconds": seconds}, result))
    return found


def run_settings(out: Path, names: list[str]) -> dict[str, set]:
    """{"steps": {...}, "seed": {...}}: the values in the rows' config.json (a row that
    reuses a checkpoint reads its source row's; a detection_budget row counts the steps the
    other rows would train for its total)."""
    seen: dict[str, set] = {"steps": set(), "seed": set()}
    for name in names:
        row = ROWS[name]
        path = out / (row.reuses or name) / "config.json"
        if path.is_file():
            cfg = dict(read_json(path).get("config", {}))
            if row.detection_budget and "steps" in cfg:
                cfg["steps"] = round(cfg["steps"] * (1.0 - row.options["pairs_ratio"]))
            for k, values in seen.items():
                if k in cfg:
                    values.add(cfg[k])
    return seen


def teacher_report(manifest: str, cache: str) -> dict:
    """The teacher stage's zero-shot report (`_MANIFEST.json`, key "zero_shot"): base_acc,
    novel_acc and, where recorded, per_category; empty when there is none."""
    try:
        name = load_manifest(manifest, cache_root=cache).name
    except ManifestError:
        return {}
    path = DatasetCache(Path(cache) / name).manifest_path(TEACHER)
    return (read_json(path).get("zero_shot") or {}) if path.is_file() else {}


def _at_least(a: float, ratio: float, b: float) -> bool:
    """a >= ratio x b, an exact tie counting as met despite floating point (0.3 vs 1.5 x 0.2)."""
    return a >= ratio * b - 1e-9


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def targets(rows: dict[str, dict], teacher: dict, oracle: dict | None) -> dict:
    """The three targets on finished rows (name -> ablation.json row), the teacher's
    zero-shot report and the oracle's AP50: the numbers each compares and "met"."""
    text, vild = rows.get("text"), rows.get("vild")
    t1: dict = {"text_novel": None, "vild_novel": None, "text_base": None, "vild_base": None,
                "novel_ratio": None, "base_ratio": None, "met": None}
    if text and vild and None not in (text["AP50_novel"], vild["AP50_novel"],
                                      text["AP50_base"], vild["AP50_base"]):
        tn, vn, tb, vb = (text["AP50_novel"], vild["AP50_novel"], text["AP50_base"],
                          vild["AP50_base"])
        novel_ok = _at_least(vn, T1_NOVEL_RATIO, tn) if tn > 0 else vn > 0
        t1 = {"text_novel": tn, "vild_novel": vn, "text_base": tb, "vild_base": vb,
              "novel_ratio": _ratio(vn, tn), "base_ratio": _ratio(vb, tb),
              "met": bool(novel_ok and _at_least(vb, T1_BASE_RATIO, tb))}

    scored = [r for r in rows.values() if r["AP50_novel"] is not None]
    best = max(scored, key=lambda r: r["AP50_novel"]) if scored else None
    on = oracle["AP50_novel"] if oracle and oracle.get("AP50_novel") is not None else None
    t2 = {"best_row": best["name"] if best else None,
          "novel": best["AP50_novel"] if best else None, "oracle_novel": on,
          "ratio": _ratio(best["AP50_novel"], on) if best else None,
          "met": None if best is None or on is None
          else _at_least(best["AP50_novel"], T2_ORACLE_RATIO, on)}

    base_acc, novel_acc = teacher.get("base_acc"), teacher.get("novel_acc")
    per_category = teacher.get("per_category") or {}
    worst = min(per_category.items(), key=lambda kv: kv[1]) if per_category else None
    t3 = {"base_acc": base_acc, "novel_acc": novel_acc,
          "worst_category": {"name": worst[0], "acc": worst[1]} if worst else None,
          "below_floor": sorted(n for n, a in per_category.items() if a < T3_CATEGORY_FLOOR),
          "met": None}
    if base_acc is not None and novel_acc is not None:
        t3["met"] = bool(_at_least(base_acc, 1.0, T3_ACCURACY)
                         and _at_least(novel_acc, 1.0, T3_ACCURACY) and not t3["below_floor"])
    return {"T1": t1, "T2": t2, "T3": t3}


def summary(out: Path, manifest: str, cache: str) -> tuple[dict, list[dict]]:
    """ablation.json's content from what is on disk, and each finished row's eval result."""
    found = finished_rows(out)
    rows = [r for r, _ in found]
    settings = run_settings(out, [r["name"] for r in rows])
    teacher = teacher_report(manifest, cache)
    oracle_file = out / ORACLE_DIR / "oracle.json"
    oracle = None
    if oracle_file.is_file():
        o = read_json(oracle_file)
        oracle = {"AP50_base": o.get("AP50_base"), "AP50_novel": o.get("AP50_novel")}
    doc = {k: (next(iter(v)) if len(v) == 1 else None) for k, v in settings.items()}
    doc.update(teacher={"base_acc": teacher.get("base_acc"),
                        "novel_acc": teacher.get("novel_acc")},
               oracle=oracle, rows=rows,
               targets=targets({r["name"]: r for r in rows}, teacher, oracle))
    return doc, [res for _, res in found]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict], results: list[dict]) -> str:
    """Markdown, one line per finished row; AP50 in percent."""
    head = ("| row | mode / heads | options | AP50 base | AP50 novel | AP50 all | image fit "
            "| train s | top class |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r, res in zip(rows, results):
        spec = ROWS[r["name"]]
        how = f"{r['mode']} / {r['heads']}" + (", --ensemble" if spec.ensemble else "")
        opts = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["options"].items())
        if spec.calibration:
            reuse = f"{spec.reuses} checkpoint, --calibration {spec.calibration}"
            opts = ", ".join(filter(None, [opts, reuse]))
        if spec.detection_budget:
            opts += ", steps / (1 - pairs_ratio) in all"
        top = res.get("top_class") or {}
        top_s = "-" if top.get("name") is None else f"{top['name']} {100 * top['share']:.0f}%"
        lines.append(f"| {r['name']} | {how} | {opts or '-'} | {_pct(r['AP50_base'])} | "
                     f"{_pct(r['AP50_novel'])} | {_pct(r['AP50_all'])} | "
                     f"{_num(r['image_fit'], '.2f')} | {_num(r['train_seconds'], '.0f')} | "
                     f"{top_s} |")
    return "\n".join(lines)


def _verdict(met) -> str:
    return {True: "met", False: "missed", None: "not judged"}[met]


def format_targets(doc: dict) -> list[str]:
    t1, t2, t3 = (doc["targets"][k] for k in ("T1", "T2", "T3"))
    lines = []
    if t1["met"] is None:
        lines.append("T1 vild against text: not judged (needs the finished rows text and vild)")
    else:
        lines.append(
            f"T1 vild against text: novel AP50 {t1['vild_novel']:.3f} vs {T1_NOVEL_RATIO} x "
            f"{t1['text_novel']:.3f} = {T1_NOVEL_RATIO * t1['text_novel']:.3f}, base AP50 "
            f"{t1['vild_base']:.3f} vs {T1_BASE_RATIO} x {t1['text_base']:.3f} = "
            f"{T1_BASE_RATIO * t1['text_base']:.3f}: {_verdict(t1['met'])}")
    if t2["met"] is None:
        lines.append("T2 best row against the teacher oracle: not judged (needs a finished "
                     "row and <out>/oracle/oracle.json)")
    else:
        lines.append(
            f"T2 best row ({t2['best_row']}) against the teacher oracle: novel AP50 "
            f"{t2['novel']:.3f} vs {T2_ORACLE_RATIO} x {t2['oracle_novel']:.3f} = "
            f"{T2_ORACLE_RATIO * t2['oracle_novel']:.3f}: {_verdict(t2['met'])}")
    if t3["met"] is None:
        lines.append("T3 teacher zero-shot accuracy: not judged (no zero-shot report in the "
                     f"teacher stage's {MANIFEST_FILE})")
    else:
        worst = t3["worst_category"]
        worst_s = (f"; worst category {worst['name']} {worst['acc']:.3f} vs "
                   f"{T3_CATEGORY_FLOOR}" if worst else "; no per-category accuracy")
        below = f" (below: {', '.join(t3['below_floor'])})" if t3["below_floor"] else ""
        lines.append(f"T3 teacher zero-shot accuracy: base {t3['base_acc']:.3f}, novel "
                     f"{t3['novel_acc']:.3f} vs {T3_ACCURACY}{worst_s}{below}: "
                     f"{_verdict(t3['met'])}")
    if doc["oracle"]:
        lines.append(f"teacher oracle (python -m ovdistill.trainer.oracle): AP50 base "
                     f"{_pct(doc['oracle']['AP50_base'])} / novel "
                     f"{_pct(doc['oracle']['AP50_novel'])}")
    for key in ("steps", "seed"):
        if doc[key] is None and doc["rows"]:
            lines.append(f"note: the rows' config.json disagree on {key} (or lack it)")
    return lines


def write_summary(out: Path, manifest: str, cache: str) -> dict:
    doc, results = summary(out, manifest, cache)
    text = "\n".join([table(doc["rows"], results), "", *format_targets(doc)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    return doc


def parse_rows(value: str) -> list[str]:
    """"text, vild" -> ["text", "vild"]; empty -> every row (ConfigError for unknown ones)."""
    names = [n.strip() for n in value.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ConfigError(f"unknown row(s) {unknown}; known: {list(ROWS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.trainer.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_options(p)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for every row")
    p.add_argument("--rows", default="",
                   help=f"comma-separated subset of {','.join(ROWS)} (default: all)")
    args = p.parse_args(argv)
    try:
        names = parse_rows(args.rows)
    except ConfigError as e:
        return report(e)
    rc = 0
    try:
        for name in names:
            run_row(ROWS[name], args)
        run_oracle(args)
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd[:4]))} ... exited with {e.returncode}",
              file=sys.stderr)
        rc = 1
    except OvdError as e:
        rc = report(e)
    try:
        write_summary(Path(args.out), args.manifest, args.cache)
    except OvdError as e:
        return report(e)
    return rc


if __name__ == "__main__":
    sys.exit(main())
