"""The Python half of `bench/gpu_smoke.sh`: its tiny manifest, the CPU-vs-device agreement
checks, and the summary block it prints (the format of BENCHMARKS.md's GPU section).

    python -m ovdistill.bench.gpu_smoke manifest --tiny OUT.yaml
    python -m ovdistill.bench.gpu_smoke regions-agreement --manifest M --cache C --images 10 --json F
    python -m ovdistill.bench.gpu_smoke eval-agreement RUN_A/eval.json RUN_B/eval.json --json F
    python -m ovdistill.bench.gpu_smoke summary --work W --results R --mode gpu

`regions-agreement` recomputes the regions rows of the first images of part 0 on the CPU in
fp32, with the cache's own teacher, and compares them with the stored rows (made on the cache's
device and precision: bf16 on CUDA): cosine per row. `eval-agreement` compares two
`trainer.evaluate` results of one checkpoint (one on CUDA, one on the CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import yaml
from ovdistill.pipeline.errors import OvdError, reports_errors
from ovdistill.pipeline.layout import INDEX, REGIONS, STAGE_FOLDERS, DatasetCache, part_file
from ovdistill.pipeline.options import REQUIRED, add_data_options

REPO = Path(__file__).resolve().parents[1]
AP_KEYS = ("AP50_novel", "AP50_base", "AP50_all")


class SmokeError(OvdError, ValueError):
    """A smoke-test input is missing or unreadable."""


# ----------------------------------------------------------------------------- tiny manifest


def tiny_manifest(toy: dict) -> dict:
    """The embedded default's manifest (`toy`, as loaded) shrunk for the CPU mode: the same
    stages and trainer on 24 train / 8 val images, a 1-epoch teacher on 300 captions, a
    6-step RPN, 20 proposals per image."""
    doc = json.loads(json.dumps(toy))
    doc["name"] = "smoke"
    doc["root"] = "{cache}/smoke/dataset"
    doc["synthetic"].update(n_train=24, n_val=8, image_side=[160, 192], n_captions=300,
                            objects_per_image=[1, 3])
    doc["stages"] = {
        "dataset": {"images_per_part": 16, "captions_per_part": 150},
        "teacher": {"epochs": 1, "batch_size": 32, "warmup": 2, "report_max_crops": 64},
        "rpn": {"steps": 6, "batch_size": 2, "warmup_steps": 1, "log_every": 2},
        "proposals": {"top_m": 20, "images_per_part": 16},
        "text": dict(toy.get("stages", {}).get("text", {})),
        "pack": {"max_samples": 8},
    }
    doc["trainer"] = {**doc.get("trainer", {}), "cached_per_image": 20, "batch_size": 2,
                      "box_batch_size_per_image": 16}
    return doc


# ----------------------------------------------------------------------------- agreement


def cosine_summary(cos) -> dict:
    """cos: Tensor[R] -> rows, min, mean, 1st percentile and the share below 0.99."""
    import torch

    cos = cos.double()
    return {"rows": len(cos), "min": float(cos.min()), "mean": float(cos.mean()),
            "p01": float(torch.quantile(cos, 0.01)),
            "below_0.99": float((cos < 0.99).double().mean())}


def regions_agreement(manifest: str, cache: str, images: int) -> dict:
    """Stored regions rows of the first `images` images of part 0 vs the same rows made now on
    the CPU in fp32 (see the module doc) -> `cosine_summary` + what made the stored rows."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from ovdistill.pipeline.annotations import images_by_id, read_images
    from ovdistill.pipeline.clip_teacher import teacher_from_cache
    from ovdistill.pipeline.layout import PROPOSALS
    from ovdistill.pipeline.manifests import image_path, load_manifest
    from ovdistill.pipeline.region_embedding import embed_regions, settings_from_config
    from ovdistill.pipeline.runner import StageContext

    dataset = load_manifest(manifest, cache_root=cache)
    ctx = StageContext(dataset=dataset, cache=Path(cache).resolve() / dataset.name,
                       device="cpu", precision="fp32")
    made = ctx.upstream(REGIONS)
    settings = settings_from_config(made["config"])
    first = part_file(ctx.stage_dir(REGIONS), 0)
    stored = pq.read_table(first)
    ids = list(dict.fromkeys(stored.column("image_id").to_pylist()))[:images]
    if not ids:
        raise SmokeError(f"{first} has no rows")
    split = dataset.split(made["config"].get("split", "train"))
    records = images_by_id(read_images(split.annotations))
    files = [(iid, image_path(split.images, records[iid])) for iid in ids]
    teacher = teacher_from_cache(ctx, "cpu", "fp32")
    proposals = pq.read_table(part_file(ctx.stage_dir(PROPOSALS), 0))
    table, rejects = embed_regions(teacher, proposals, files, **settings)
    if rejects:
        raise SmokeError(f"regions agreement: rejects while recomputing: {rejects[:1]}")

    def emb(t):
        flat = np.asarray(t.column("embedding").combine_chunks().flatten(), dtype=np.float32)
        return torch.from_numpy(flat.reshape(len(t), -1))

    import pyarrow.compute as pc

    stored = stored.filter(pc.is_in(stored.column("image_id"), value_set=table["image_id"]))
    if stored.column("image_id").to_pylist() != table.column("image_id").to_pylist() or \
            stored.column("rank").to_pylist() != table.column("rank").to_pylist():
        raise SmokeError("regions agreement: the recomputed rows are not the stored rows")
    out = cosine_summary(F.cosine_similarity(emb(stored), emb(table)))
    out.update(images=len(ids), stored_inputs={k: made["inputs"].get(k)
                                               for k in ("device", "precision")},
               recomputed={"device": "cpu", "precision": "fp32"})
    return out


def eval_agreement(a: Path, b: Path) -> dict:
    """Two `eval*.json` of one checkpoint -> their AP50s and the absolute differences."""
    runs = {}
    for path in (a, b):
        try:
            runs[str(path)] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SmokeError(f"{path}: cannot read an eval result ({e})") from None
    (pa_, ra), (pb, rb) = runs.items()
    ca, cb = (Path(str(r.get("checkpoint"))).resolve() for r in (ra, rb))
    if ca != cb or ra.get("step") != rb.get("step"):
        raise SmokeError(f"{pa_} and {pb} evaluate different checkpoints ({ca}, {cb})")
    diff = {k: _absdiff(ra.get(k), rb.get(k)) for k in AP_KEYS}
    return {"a": {k: ra.get(k) for k in (*AP_KEYS, "n_images", "n_detections", "seconds")},
            "b": {k: rb.get(k) for k in (*AP_KEYS, "n_images", "n_detections", "seconds")},
            "abs_diff": diff, "checkpoint": ra.get("checkpoint"), "step": ra.get("step")}


def _absdiff(x, y):
    if x is None or y is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return abs(float(x) - float(y))


# ----------------------------------------------------------------------------- summary


def read_steps(path: Path) -> list[tuple[str, str, float]]:
    """steps.tsv (name, status, seconds per line) -> rows."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, secs = line.split("\t")
            rows.append((name, status, float(secs)))
    return rows


def parse_regions_bench(text: str) -> dict:
    """The ViT-B-32 table of `bench.regions_bench` -> its figures (empty when absent)."""
    out: dict = {}
    head = re.search(r"(?m)^model=(\S+) \(S=(\d+), D=(\d+)\) device=(\S+) images=(\d+) of "
                     r"(\d+x\d+), M=(\d+), batch=(\d+), torch threads=(\d+)", text)
    if head:
        out.update(model=head[1], size=int(head[2]), dim=int(head[3]), device=head[4],
                   images=int(head[5]), image_size=head[6], m=int(head[7]),
                   batch=int(head[8]), threads=int(head[9]))
    for key, label in (("e2e", r"end-to-end \(decode\+crops\+encode\+write\)"),
                       ("bare", r"bare teacher forward \(crops already made\)"),
                       ("pil", r"crops: per-crop PIL crop \+ preprocess"),
                       ("batched", r"crops: batched \(a few ops per image\)")):
        row = re.search(rf"(?m)^{label}\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text)
        if row:
            out[key] = {"crops": int(row[1]), "seconds": float(row[2]),
                        "crops_per_s": float(row[3]), "cpu_s": float(row[4])}
    ratio = re.search(r"ratio end-to-end / bare: wall ([\d.]+), cpu ([\d.]+)", text)
    if ratio:
        out["ratio_wall"], out["ratio_cpu"] = float(ratio[1]), float(ratio[2])
    return out


def parse_train_bench(text: str) -> dict:
    """`bench.train_bench`'s table -> {stream|memory: {s_per_step, steps_per_s, images_per_s,
    data_wait_pct}, ratio, workers, batch}."""
    out: dict = {}
    head = re.search(r"(\d+) steps each, batch (\d+), mode (\S+), (\d+) loader worker", text)
    if head:
        out.update(steps=int(head[1]), batch=int(head[2]), mode=head[3],
                   workers=int(head[4]))
    for kind in ("stream", "memory"):
        row = re.search(rf"(?m)^{kind}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%", text)
        if row:
            out[kind] = {"s_per_step": float(row[1]), "steps_per_s": float(row[2]),
                         "images_per_s": float(row[3]), "data_wait_pct": float(row[4])}
    ratio = re.search(r"ratio \(in-memory time / streaming time\): ([\d.]+)", text)
    if ratio:
        out["ratio"] = float(ratio[1])
    return out


def pipeline_figures(cache_dir: Path) -> dict:
    """Seconds (summed over parts) of each finished stage, regions crops/s, the index line."""
    out: dict = {"stage_seconds": {}}
    for name in STAGE_FOLDERS:
        path = DatasetCache(cache_dir).manifest_path(name)
        if path.is_file():
            m = json.loads(path.read_text())
            out["stage_seconds"][name] = m.get("seconds")
            if name == REGIONS:
                out["regions_crops_per_s"] = m.get("crops_per_s")
                out["regions_inputs"] = {k: m["inputs"].get(k) for k in ("device", "precision")}
            if name == INDEX:
                out["index"] = m.get("index", {}).get("placement")
    return out


def train_figures(run: Path, resumed_log: str) -> dict:
    """The last logged row of `run/metrics.jsonl` and where the resumed run started."""
    rows = []
    path = run / "metrics.jsonl"
    if path.is_file():
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    start = re.search(r"steps=(\d+)->(\d+)", resumed_log)
    out = {"resumed_from": int(start[1]) if start else None,
           "steps": int(start[2]) if start else None}
    if rows:
        last = rows[-1]
        out.update(final_step=last.get("step"), loss=last.get("loss"),
                   s_per_step=last.get("sec_per_step"), images_per_s=last.get("images_per_sec"))
    return out


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def summary(work: Path, results: Path, mode: str, machine: str) -> tuple[str, dict]:
    """The summary block and its figures as JSON, from the step logs and outputs in `work`."""
    logs = work / "logs"
    steps = read_steps(work / "steps.tsv")
    figures: dict = {"mode": mode, "machine": machine,
                     "steps": [{"step": n, "status": s, "seconds": t} for n, s, t in steps]}
    reg = figures["regions_bench"] = parse_regions_bench(_read(logs / "regions_bench.log"))
    cache_name = "toy" if mode == "gpu" else "smoke"
    pipe = figures["pipeline"] = pipeline_figures(work / "cache" / cache_name)
    tb = figures["train_bench"] = parse_train_bench(_read(logs / "train_bench.log"))
    tr = figures["train"] = train_figures(work / "runs" / "train", _read(logs / "resume.log"))
    ev = figures["eval"] = (json.loads(_read(work / "eval_agreement.json"))
                            if (work / "eval_agreement.json").is_file() else {})
    ra = figures["regions_agreement"] = (json.loads(_read(work / "regions_agreement.json"))
                                         if (work / "regions_agreement.json").is_file() else {})

    lines = [f"== ovdistill GPU smoke ({mode} mode): bench/gpu_smoke.sh",
             f"machine: {machine}"]
    lines.append("steps: " + ", ".join(f"{n} {s} {t:.0f}s" for n, s, t in steps))
    if reg.get("e2e") and reg.get("bare"):
        lines.append(
            f"regions bench: {reg['model']} (S={reg['size']}, D={reg['dim']}) on {reg['device']}, "
            f"{reg['images']} images {reg['image_size']}, M={reg['m']}, batch {reg['batch']}: "
            f"end-to-end {reg['e2e']['crops_per_s']:,.0f} crops/s, bare forward "
            f"{reg['bare']['crops_per_s']:,.0f} crops/s, end-to-end / bare "
            f"{_f(reg.get('ratio_wall'))} (targets >= 25,000 crops/s on an H100-class GPU, "
            f">= 0.80); batched crops {reg['batched']['crops_per_s']:,.0f} vs per-crop PIL "
            f"{reg['pil']['crops_per_s']:,.0f} crops/s")
    else:
        lines.append("regions bench: no figures (see smoke.log)")
    secs = pipe["stage_seconds"]
    lines.append("pipeline (" + ("embedded default" if mode == "gpu" else "tiny") + ", "
                 "--distributor local), stage seconds: "
                 + " | ".join(f"{k} {_f(secs.get(k), '.1f')}" for k in STAGE_FOLDERS)
                 + f"; regions {_f(pipe.get('regions_crops_per_s'), ',.0f')} crops/s "
                 f"({pipe.get('regions_inputs')}); index: {pipe.get('index', '-')}")
    if tb.get("stream") and tb.get("memory"):
        lines.append(
            f"train bench ({tb.get('mode')}, batch {tb.get('batch')}, {tb.get('workers')} loader "
            f"worker(s), {tb.get('steps')} steps each): streaming "
            f"{tb['stream']['steps_per_s']:.2f} steps/s ({tb['stream']['images_per_s']:.1f} "
            f"images/s, data wait {tb['stream']['data_wait_pct']:.1f}%), in memory "
            f"{tb['memory']['steps_per_s']:.2f} steps/s; in-memory / streaming time "
            f"{_f(tb.get('ratio'))} (target >= 0.90)")
    else:
        lines.append("train bench: no figures (see smoke.log)")
    lines.append(f"train + resume: {_f(tr.get('resumed_from'), 'd')} steps, resumed to "
                 f"{_f(tr.get('final_step'), 'd')}: loss {_f(tr.get('loss'))}, "
                 f"{_f(tr.get('s_per_step'))} s/step, {_f(tr.get('images_per_s'), '.1f')} "
                 f"images/s")
    if ev:
        a, b, d = ev["a"], ev["b"], ev["abs_diff"]
        lines.append(
            f"eval, same checkpoint (step {ev.get('step')}, {a.get('n_images')} val images): "
            + f"{mode_device(mode)} " + " ".join(f"{k} {_f(a.get(k), '.4f')}" for k in AP_KEYS)
            + f" ({a.get('n_detections')} dets) | cpu "
            + " ".join(f"{k} {_f(b.get(k), '.4f')}" for k in AP_KEYS)
            + f" ({b.get('n_detections')} dets) | |diff| "
            + " ".join(f"{k} {_f(d.get(k), '.4f')}" for k in AP_KEYS))
    else:
        lines.append("eval agreement: no figures (see smoke.log)")
    if ra:
        lines.append(
            f"region embeddings, stored ({ra['stored_inputs']['device']}, "
            f"{ra['stored_inputs']['precision']}) vs recomputed (cpu, fp32), {ra['rows']} rows of "
            f"{ra['images']} images: cosine min {ra['min']:.5f}, p01 {ra['p01']:.5f}, mean "
            f"{ra['mean']:.5f}, below 0.99 {100 * ra['below_0.99']:.2f}%")
    else:
        lines.append("region embedding agreement: no figures (see smoke.log)")
    failed = [n for n, s, _ in steps if s != "ok"]
    lines.append("result: " + ("every step ok" if steps and not failed
                               else f"NOT every step ok: {', '.join(failed) or 'none ran'}"))
    return "\n".join(lines), figures


def mode_device(mode: str) -> str:
    return "cuda" if mode == "gpu" else "cpu"


def machine_line() -> str:
    """`bench.run_all.machine()` (CPU, cores, GPU, torch) plus Python; less where it fails."""
    import platform

    try:
        from ovdistill.bench.run_all import machine

        line = machine()
    except Exception as e:  # noqa: BLE001 - the summary must still be written
        line = f"{platform.machine()} ({type(e).__name__}: {e})"
    return f"{line}, python {platform.python_version()}"


# ----------------------------------------------------------------------------- CLI


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovdistill.bench.gpu_smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest")
    m.add_argument("--tiny", required=True, metavar="OUT.yaml")
    r = sub.add_parser("regions-agreement")
    add_data_options(r, manifest=REQUIRED, cache=REQUIRED)
    r.add_argument("--images", type=int, default=10)
    r.add_argument("--json", required=True)
    e = sub.add_parser("eval-agreement")
    e.add_argument("a")
    e.add_argument("b")
    e.add_argument("--json", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    s.add_argument("--results", required=True)
    s.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    s.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    args = p.parse_args(argv)

    if args.command == "manifest":
        toy = yaml.safe_load((REPO / "data_manifests" / "toy.yaml").read_text())
        Path(args.tiny).write_text(yaml.safe_dump(tiny_manifest(toy), sort_keys=False))
    elif args.command in ("regions-agreement", "eval-agreement"):
        out = (regions_agreement(args.manifest, args.cache, args.images)
               if args.command == "regions-agreement"
               else eval_agreement(Path(args.a), Path(args.b)))
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(json.dumps(out))
    else:
        work, results = Path(args.work), Path(args.results)
        saved = work / "machine.txt"  # written by the script's setup step
        machine = saved.read_text().strip() if saved.is_file() else machine_line()
        text, figures = summary(work, results, args.mode, machine)
        (results / "summary.txt").write_text(text + "\n")
        (results / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
        if not args.quiet:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
