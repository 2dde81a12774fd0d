"""`python -m trainer.ablation`: the ViLD paper's central ablation on one manifest.

Trains and evaluates, with the same steps and seed (the manifest's `trainer:` block, then
--steps / --seed / --set):

    text      --mode text                        ViLD-text
    image     --mode image                       ViLD-image
    vild      --mode vild                        ViLD (one shared head)
    ensemble  --mode vild --heads separate       ViLD-ensemble (evaluated with --ensemble)

each into <out>/<row>/, then prints the AP50 base / novel table and writes it to
<out>/ablation.md and <out>/ablation.json with the paper's two checks: vild novel AP50 >=
1.5 x text novel AP50, and vild novel AP50 >= 0.30. "image fit" is the final loss_image over
the loss of predicting the teacher's mean direction (1.0: nothing region-specific learned).
"base, base texts" is each row evaluated again with `--vocabulary base`: the base AP50 of the
same model when no novel text competes for its regions.
Re-running skips rows whose eval file exists and resumes a row whose training was cut off
(`--resume latest`). `python -m trainer.oracle` gives the teacher's own ceiling.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from trainer.evaluate import result_suffix

ROWS = {
    "text": (["--mode", "text"], False),
    "image": (["--mode", "image"], False),
    "vild": (["--mode", "vild"], False),
    "ensemble": (["--mode", "vild", "--heads", "separate"], True),
}
NOVEL_RATIO = 1.5  # vild novel AP50 against text novel AP50
NOVEL_FLOOR = 0.30  # vild novel AP50


def row_eval_file(run: Path, ensemble: bool, base_vocab: bool = False) -> Path:
    return run / f"eval{result_suffix(ensemble, base_vocab)}.json"


def base_vocab_ap50(run: Path, ensemble: bool) -> float | None:
    """AP50_base of the row's `--vocabulary base` evaluation, None if it was not run."""
    path = row_eval_file(run, ensemble, base_vocab=True)
    return json.loads(path.read_text())["AP50_base"] if path.is_file() else None


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


def run_row(name: str, args, log=print) -> dict:
    """Train (or resume) and evaluate one row; -> its eval.json content plus train seconds."""
    flags, ensemble = ROWS[name]
    run = Path(args.out) / name
    result_file = row_eval_file(run, ensemble)
    if result_file.is_file():
        log(f"[{name}] already evaluated: {result_file}")
        result = json.loads(result_file.read_text())
        result["AP50_base_base_vocab"] = base_vocab_ap50(run, ensemble)
        return result
    common = ["--manifest", args.manifest, "--cache", args.cache]
    cmd = [sys.executable, "-m", "trainer.train", *common, "--out", str(run), *flags]
    cmd += [f"--steps={args.steps}"] if args.steps else []
    cmd += [f"--seed={args.seed}"] if args.seed is not None else []
    for kv in args.set:
        cmd += ["--set", kv]
    if (run / "latest.pt").is_file():
        cmd += ["--resume", "latest"]
    log(f"[{name}] {' '.join(cmd)}")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    train_seconds = round(time.time() - t0, 1)
    cmd = [sys.executable, "-m", "trainer.evaluate", *common, "--run", str(run)]
    cmd += ["--ensemble"] if ensemble else []
    for extra in ([], ["--vocabulary", "base"]):
        log(f"[{name}] {' '.join(cmd + extra)}")
        subprocess.run(cmd + extra, check=True)
    result = json.loads(result_file.read_text())
    result["train_seconds"] = train_seconds
    result["image_fit"] = image_fit(run)
    result["AP50_base_base_vocab"] = base_vocab_ap50(run, ensemble)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def checks(results: dict[str, dict]) -> dict:
    """The paper's two claims on this run, as booleans with the numbers they compare."""
    text, vild = results.get("text"), results.get("vild")
    if not text or not vild:
        return {}
    t, v = text["AP50_novel"], vild["AP50_novel"]
    return {
        "vild_over_text_novel": round(v / t, 3) if t else None,
        "vild_over_text_novel_ok": bool(t and v >= NOVEL_RATIO * t) or (t == 0 and v > 0),
        "vild_novel_ok": v >= NOVEL_FLOOR,
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per mode, AP50 base / novel / all in percent."""
    head = ("| mode | AP50 base | AP50 novel | AP50 all | AP novel | steps | image fit "
            "| AP50 base, base texts |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        fit, closed = r.get("image_fit"), r.get("AP50_base_base_vocab")
        lines.append(f"| {name} | {100 * r['AP50_base']:.1f} | {100 * r['AP50_novel']:.1f} | "
                     f"{100 * r['AP50_all']:.1f} | {100 * r['AP_novel']:.1f} | {r['step']} | "
                     f"{'-' if fit is None else f'{fit:.2f}'} | "
                     f"{'-' if closed is None else f'{100 * closed:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="data_manifests/toy.yaml")
    p.add_argument("--cache", default="cache")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated subset of {','.join(ROWS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"error: unknown row(s) {unknown}; known: {list(ROWS)}", file=sys.stderr)
        return 2
    try:
        results = {n: run_row(n, args) for n in names}
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(e.cmd[:4])} ... exited with {e.returncode}", file=sys.stderr)
        return 1
    md = table(results)
    verdict = checks(results)
    out = Path(args.out)
    (out / "ablation.md").write_text(md + "\n")
    (out / "ablation.json").write_text(json.dumps({"rows": results, "checks": verdict},
                                                  indent=2) + "\n")
    print(md)
    if verdict:
        print(f"vild / text novel AP50: {verdict['vild_over_text_novel']} "
              f"(target >= {NOVEL_RATIO}: {'met' if verdict['vild_over_text_novel_ok'] else 'missed'}); "
              f"vild novel AP50 >= {NOVEL_FLOOR}: {'met' if verdict['vild_novel_ok'] else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
