"""`python -m ovdistill run | status | query | release-teacher`.

`run` executes the stages in order on one dataset manifest; the same command starts and
resumes. Stages whose `_MANIFEST.json` matches the requested config are skipped.
`release-teacher` exports the teacher a cache's teacher stage trained as a committed release
file (`make toy-teacher` regenerates the embedded default's and compares it byte for byte).
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ovdistill.pipeline import layout
from ovdistill.pipeline.errors import OvdError, report
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.options import add_data_options, assignment, positive_int
from ovdistill.pipeline.precision import PRECISIONS
from ovdistill.pipeline.runner import (
    CacheLock,
    StageContext,
    dry_run_stage,
    make_config,
    run_stage,
    stage_folder,
    stage_status,
)

# The stages, in the order they run. Each is a module of `stages/` (see pipeline/runner.py).
# `text` follows `regions`: it also writes the mean region embedding (trainer center_targets).
# The pairs stages (image-text pairs, DetCLIPv2) plan nothing for a manifest without `pairs:`,
# the grounding stage (GLIP's grounding data) nothing without `grounding:`.
STAGES = [
    "ovdistill.stages.dataset",
    "ovdistill.stages.pairs",
    "ovdistill.stages.grounding",
    "ovdistill.stages.teacher",
    "ovdistill.stages.rpn",
    "ovdistill.stages.proposals",
    "ovdistill.stages.regions",
    "ovdistill.stages.text",
    "ovdistill.stages.phrases",
    "ovdistill.stages.pair_proposals",
    "ovdistill.stages.pair_regions",
    "ovdistill.stages.pseudo_boxes",
    "ovdistill.stages.pack",
    "ovdistill.stages.pair_pack",
    "ovdistill.stages.index",
]


def stage_name(module: str) -> str:
    return module.rsplit(".", 1)[1]


def parse_overrides(pairs: list[str]) -> dict[str, dict]:
    """`["proposals.top_m=300", ...]` -> {"proposals": {"top_m": 300}} (YAML-typed values)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        expected = "STAGE.KEY=VALUE"
        if "." not in pair.partition("=")[0]:
            raise SystemExit(f"--set expects {expected}, got {pair!r}")
        key, value = assignment(pair, expected, SystemExit)
        stage, _, field = key.partition(".")
        out.setdefault(stage, {})[field] = value
    return out


# Config fields that name a file: a relative one is taken from the working directory and
# recorded absolute, since Ray workers may run in another folder (as the cache root).
FILE_FIELDS = ("pretrained", "model_config", "checkpoint", "backbone_checkpoint")


def stage_overrides(dataset, overrides: dict, name: str) -> dict:
    """Stage `name`'s config overrides: the manifest's `stages:` block, then --set and the
    flags; an existing relative file in FILE_FIELDS made absolute."""
    out = {**dataset.stages.get(name, {}), **overrides.get(name, {})}
    for key in FILE_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and Path(value).is_file():
            out[key] = str(Path(value).resolve())
    return out


def cmd_run(args) -> int:
    overrides = parse_overrides(args.set)
    if args.rpn_checkpoint:
        overrides.setdefault("rpn", {})["checkpoint"] = args.rpn_checkpoint
    for key in ("model", "pretrained", "model_config"):
        value = getattr(args, f"teacher_{key}")
        if value:
            overrides.setdefault("teacher", {})[key] = value
    wanted = None if not args.stages else [s.strip() for s in args.stages.split(",")]
    known = [stage_name(m) for m in STAGES]
    for s in list(wanted or []) + list(overrides):
        if s not in known:
            raise SystemExit(f"unknown stage {s!r}; stages are {known}")
    try:
        # absolute: Ray workers and the teacher's training subprocess run in other folders
        cache_root = Path(args.cache).resolve()
        dataset = load_manifest(args.manifest, cache_root=cache_root, data_root=args.data_root)
        ctx = StageContext(dataset=dataset, cache=cache_root / dataset.name,
                           device=args.device, precision=args.precision)
        if args.dry_run:
            return dry_run(ctx, dataset, wanted, overrides, rebuild=args.rebuild)
        with CacheLock(ctx.cache):
            for module_name in STAGES:
                name = stage_name(module_name)
                if wanted is not None and name not in wanted:
                    continue
                stage = importlib.import_module(module_name)
                cfg = make_config(stage, stage_overrides(dataset, overrides, name))
                run_stage(stage, ctx, cfg, distributor=args.distributor,
                          workers=args.workers, cpus_per_gpu=args.cpus_per_gpu,
                          rebuild=args.rebuild,
                          progress=not args.no_progress)
    except OvdError as e:  # every project error: one line, exit status 2
        return report(e)
    return 0


def dry_run(ctx: StageContext, dataset, wanted, overrides: dict, *, rebuild: bool) -> int:
    """One line per selected stage: what `run` would do (`runner.dry_run_stage`). No lock is
    taken and nothing is written, so it may run beside a run in flight. A stage after one
    that would run is judged against the cache as it is now (the upstream's old manifest)."""
    pending = None
    for module_name in STAGES:
        name = stage_name(module_name)
        if wanted is not None and name not in wanted:
            continue
        stage = importlib.import_module(module_name)
        cfg = make_config(stage, stage_overrides(dataset, overrides, name))
        line = dry_run_stage(stage, ctx, cfg, rebuild=rebuild)
        after = f" (judged before '{pending}' reruns)" if pending else ""
        print(f"[{stage.NAME}] {line}{after}", flush=True)
        if pending is None and not line.startswith("up to date"):
            pending = stage.NAME
    return 0


def cmd_status(args) -> int:
    root = Path(args.cache)
    datasets = [root / args.dataset] if args.dataset else sorted(
        p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if not datasets:
        print(f"no cache under {root}")
        return 1
    for ds in datasets:
        order = [stage_folder(importlib.import_module(m)) for m in STAGES]
        order += sorted(p.parent.name for p in ds.glob(f"*/{layout.PLAN_FILE}")
                        if p.parent.name not in order)
        print(f"{ds}")
        print(f"  {'stage':<10} {'parts':>11} {'rows':>10} {'rejects':>8}  state")
        for name in order:
            d = ds / name
            if not d.is_dir():
                print(f"  {name:<10} {'-':>11} {'-':>10} {'-':>8}  not started")
                continue
            s = stage_status(d)
            total = "?" if s["total"] is None else s["total"]
            state = "complete" if s["complete"] else "in progress"
            parts = f"{s['done']}/{total}"
            print(f"  {name:<10} {parts:>11} {s['rows']:>10} {s['rejects']:>8}  {state}")
    return 0


def cmd_release_teacher(args) -> int:
    from ovdistill.pipeline.cache import sha256_file
    from ovdistill.stages import teacher as T

    cache_root = Path(args.cache).resolve()
    dataset = load_manifest(args.manifest, cache_root=cache_root)
    files = layout.DatasetCache(cache_root / dataset.name)
    recorded = files.read_manifest(T.NAME)
    where = files.stage_dir(T.NAME)
    if "train" not in recorded:
        raise T.TeacherError(f"{where}: its teacher was loaded from "
                             f"{recorded['teacher']['pretrained']}, not trained by the stage; "
                             f"release-teacher exports a trained one (train it with --set "
                             f"teacher.pretrained=null)")
    weights = where / Path(recorded["teacher"]["pretrained"]).name
    out = Path(args.out)
    sha = T.write_release(weights, out)
    zs = recorded.get("zero_shot") or {}
    print(f"[release-teacher] {out}: sha256 {sha}, {out.stat().st_size / 2**20:.1f} MiB, "
          f"from {weights} (sha256 {recorded['teacher']['sha256'][:12]}..., zero-shot base "
          f"{zs.get('base_acc')} / novel {zs.get('novel_acc')})")
    if not args.compare:
        return 0
    committed = Path(args.compare)
    if not committed.is_file():
        raise T.TeacherError(f"--compare {committed}: no such file")
    theirs = sha256_file(committed)
    if theirs == sha:
        print(f"[release-teacher] identical to {committed} (sha256 {sha[:12]}...)")
        return 0
    print(f"[release-teacher] differs from {committed}: sha256 {sha[:12]}... != "
          f"{theirs[:12]}...; {T.release_difference(out, committed)}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovdistill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) the stages on a dataset manifest")
    add_data_options(r, data_root=True, device=True,
                     device_help="auto | cpu | cuda | cuda:N (local only)")
    r.add_argument("--stages", default=None, help="comma-separated subset, e.g. text,regions")
    r.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one stage config field (repeatable)")
    r.add_argument("--rebuild", action="store_true",
                   help="discard a stage's outputs made with another config or input")
    r.add_argument("--distributor", choices=("ray", "local"), default="ray",
                   help="ray: parts run as Ray actor calls (RAY_ADDRESS or a local cluster)")
    r.add_argument("--workers", type=int, default=None, help="Ray actors per stage")
    r.add_argument("--cpus-per-gpu", type=positive_int, default=None, metavar="N",
                   help="CPUs (torch threads) of each GPU stage's Ray actor, per GPU (default: "
                        "a node's CPUs // its GPUs; with --device cpu the stage's own count)")
    r.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast of the device stages: auto = bf16 on CUDA, fp32 on CPU")
    r.add_argument("--teacher-model", default=None, help="open_clip model name")
    r.add_argument("--teacher-pretrained", default=None,
                   help="open_clip pretrained tag or a local checkpoint path")
    r.add_argument("--teacher-model-config", default=None, help="custom model-config JSON")
    r.add_argument("--rpn-checkpoint", default=None, help="use this RPN, skip its training")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--dry-run", action="store_true",
                   help="print what each stage would do (up to date / would resume / would "
                        "run / would refuse: why); writes nothing, starts no Ray")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="done / total parts and rows of every stage")
    s.add_argument("--cache", default="cache")
    s.add_argument("--dataset", default=None)
    s.set_defaults(func=cmd_status)

    from ovdistill import query

    q = sub.add_parser("query", help="text -> region search over the cache; writes a contact sheet")
    query.add_arguments(q)
    q.set_defaults(func=query.run)

    t = sub.add_parser("release-teacher",
                       help="export the teacher a cache's teacher stage trained (float16), "
                            "optionally compared byte for byte with a committed one")
    add_data_options(t)
    t.add_argument("--out", required=True, help="the release file to write")
    t.add_argument("--compare", default=None, metavar="FILE",
                   help="exit 1 unless --out equals FILE byte for byte")
    t.set_defaults(func=cmd_release_teacher)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OvdError as e:
        return report(e)
