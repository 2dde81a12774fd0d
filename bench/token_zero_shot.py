"""The teacher's zero-shot on val GT crops with the grounding rows' possible text sides: the
text stage's prompt-ensembled class embeddings against per-token features of one-name prompts
("red star.") through the teacher's own `text_projection`: the end-of-text token, the phrase's
last, first and mean token (BENCHMARKS lab log 56).

    python -m ovdistill.bench.token_zero_shot [--manifest M] [--cache C] [--out FILE.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F
from ovdistill.pipeline import clip_teacher
from ovdistill.pipeline.clip_teacher import prompt_templates, teacher_from_cache
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.manifests import load_manifest
from ovdistill.pipeline.prompts import all_class_prompts, max_prompt_tokens, open_clip_tokenize
from ovdistill.stages.teacher import zero_shot_report


def token_embeddings(teacher, names: list[str]) -> dict[str, torch.Tensor]:
    """{token choice: class embeddings Tensor[C, D], L2-normalised} from one-name prompts."""
    tokenize = open_clip_tokenize(teacher.tokenizer)
    prompts = all_class_prompts(names, max_prompt_tokens(int(teacher.tokenizer.context_length)),
                                tokenize, 1)
    projection = clip_teacher._text_tower(teacher.model).text_projection.float()
    with torch.no_grad():
        feats, mask = teacher.encode_tokens([p.text for p in prompts])
    eot = mask.sum(1) - 1
    rows: dict[str, list] = {"eot": [], "last": [], "mean": [], "first": []}
    for k, p in enumerate(prompts):
        (c,) = p.classes
        start, end = p.spans[c]
        rows["eot"].append(feats[k, eot[k]])
        rows["last"].append(feats[k, end - 1])
        rows["first"].append(feats[k, start])
        rows["mean"].append(feats[k, start:end].mean(0))
    return {m: F.normalize(torch.stack(r) @ projection, dim=-1) for m, r in rows.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default="data_manifests/toy.yaml")
    p.add_argument("--cache", default="cache")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ds = load_manifest(args.manifest, cache_root=args.cache)
    teacher = teacher_from_cache(DatasetCache(f"{args.cache}/{ds.name}"), "cpu")
    cats = list(ds.categories())
    split = ds.split("val")
    texts = {"ensembled": None, **token_embeddings(teacher, [c.name for c in cats])}
    out = {}
    for m, text in texts.items():
        rep, _ = zero_shot_report(teacher, split.annotations, split.images, cats,
                                  prompt_templates("simple"), text=text)
        out[m] = rep
        worst = sorted(rep["per_category"].items(), key=lambda kv: kv[1])[:4]
        print(m, "base", round(rep["base_acc"], 3), "novel", round(rep["novel_acc"], 3), worst,
              flush=True)
    print("per novel category:")
    for c in cats:
        if c.split == "novel":
            print(c.name, {m: out[m]["per_category"].get(c.name) for m in out})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
