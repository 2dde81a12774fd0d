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
from ovdistill.stages import teacher as tstage

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--manifest", default="data_manifests/toy.yaml")
p.add_argument("--cache", default="cache")
p.add_argument("--out", default=None)
args = p.parse_args()
ds = load_manifest(args.manifest, cache_root=args.cache)
cache = DatasetCache(f"{args.cache}/{ds.name}")
teacher = teacher_from_cache(cache, "cpu")
cats = list(ds.categories())
names = [c.name for c in cats]
tok = open_clip_tokenize(teacher.tokenizer)
prompts = all_class_prompts(names, max_prompt_tokens(int(teacher.tokenizer.context_length)),
                            tok, 1)
tower = clip_teacher._text_tower(teacher.model)
proj = tower.text_projection.float()
with torch.no_grad():
    feats, mask = teacher.encode_tokens([p.text for p in prompts])
modes = {}
eot = mask.sum(1) - 1
rows = {"eot": [], "last": [], "mean": [], "first": []}
for k, p in enumerate(prompts):
    (c,) = p.classes
    s, e = p.spans[c]
    rows["eot"].append(feats[k, eot[k]])
    rows["last"].append(feats[k, e - 1])
    rows["first"].append(feats[k, s])
    rows["mean"].append(feats[k, s:e].mean(0))
for m, r in rows.items():
    modes[m] = F.normalize(torch.stack(r) @ proj, dim=-1)

orig = tstage.text_embeddings
split = ds.split("val")
out = {}
for m in ["ensembled"] + list(modes):
    if m != "ensembled":
        tstage.text_embeddings = lambda *a, _m=m, **k: modes[_m]
    else:
        tstage.text_embeddings = orig
    rep, _ = tstage.zero_shot_report(teacher, split.annotations, split.images, cats,
                                     prompt_templates("simple"))
    out[m] = rep
    worst = sorted(rep["per_category"].items(), key=lambda kv: kv[1])[:4]
    print(m, "base", round(rep["base_acc"], 3), "novel", round(rep["novel_acc"], 3), worst,
          flush=True)
novel = [c.name for c in cats if c.split == "novel"]
print("per novel category:")
for n in novel:
    print(n, {m: out[m]["per_category"].get(n) for m in out})
if args.out:
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
