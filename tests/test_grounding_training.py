"""GLIP's detection as grounding in the trainer, on the tiny fixture cache with a tiny real
open_clip teacher (embed_dim = the fixture's D, an 8-token context so the 4-class vocabulary
is chunked into two prompts) and a grounding.json written here by hand: caption token spans,
the iteration pattern, the focal targets, the loss on a fixed batch, fusion, the grounding
scoring of evaluate against a reference, training, resume and the teacher check."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ovdistill.bench.wds_fixture import BASE, NOVEL, TINY_SETTINGS, write_tiny_cache
from ovdistill.pipeline import layout
from ovdistill.pipeline.cache import atomic_write_json
from ovdistill.pipeline.clip_teacher import (
    TeacherSpec,
    load_teacher,
    register_model_config,
    teacher_from_cache,
)
from ovdistill.pipeline.layout import DatasetCache
from ovdistill.pipeline.prompts import caption_token_spans, open_clip_tokenize
from ovdistill.trainer import model as model_module
from ovdistill.trainer.config import ConfigError, make_config
from ovdistill.trainer.data import train_loader
from ovdistill.trainer.evaluate import load_run
from ovdistill.trainer.evaluate import main as eval_main
from ovdistill.trainer.grounding_data import (
    DETECTION,
    GROUNDING,
    PAIRS,
    PSEUDO,
    GroundingStream,
    caption_positive,
    detection_prompt_targets,
    iteration_kind,
    phrase_prompts,
)
from ovdistill.trainer.inputs import load_vocabulary, text_parquet_path
from ovdistill.trainer.model import OpenVocabDetector
from ovdistill.trainer.pair_data import is_pair_iteration
from ovdistill.trainer.train import main as train_main

SETS = [arg for k, v in TINY_SETTINGS.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
SEED = 0
MODEL = "gl-tiny-clip"
CONTEXT = 8  # 6 prompt tokens: "box. ball. bar." fits, the 4 classes take two prompts


def _teacher_files(folder, dim: int) -> TeacherSpec:
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{MODEL}.json"
    config.write_text(json.dumps({
        "embed_dim": dim,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 32,
                     "heads": 2, "layers": 1}}))
    spec = TeacherSpec(MODEL, None, str(config))
    register_model_config(spec)
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), weights)
    return TeacherSpec(MODEL, str(weights), str(config))


def _grounding_json(dataset_dir) -> dict:
    """The train images with captions naming up to two of their classes ("box and ball"),
    each box of a named class tied to its name's characters."""
    train = json.loads((dataset_dir / layout.DATASET / "train.json").read_text())
    names = {c["id"]: c["name"] for c in train["categories"]}
    images, anns = [], []
    for im in train["images"]:
        boxes = [a for a in train["annotations"] if a["image_id"] == im["id"]]
        named = list(dict.fromkeys(names[a["category_id"]] for a in boxes))[:2]
        caption, spans = "", {}
        for n in named:
            caption += " and " if caption else ""
            spans[n] = (len(caption), len(caption) + len(n))
            caption += n
        images.append({**im, "caption": caption or "nothing"})
        for a in boxes:
            if names[a["category_id"]] in spans:
                anns.append({"id": len(anns) + 1, "image_id": im["id"], "bbox": a["bbox"],
                             "category_id": a["category_id"],
                             "tokens_positive": [list(spans[names[a["category_id"]]])]})
    return {"images": images, "annotations": anns,
            "categories": [c for c in train["categories"] if c["name"] in BASE]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = write_tiny_cache(tmp_path_factory.mktemp("tiny"))
    spec = _teacher_files(t.root / "teacher-files", t.dim)
    identity = load_teacher(spec).identity
    atomic_write_json(DatasetCache(t.dataset_dir).manifest_path(layout.TEACHER),
                      {"stage": "teacher", "teacher": identity})
    folder = t.root / "grounding"
    folder.mkdir()
    (folder / "grounding.json").write_text(json.dumps(_grounding_json(t.dataset_dir)))
    return t


def _grounding_args(tiny):
    return ["--grounding-file", str(tiny.root / "grounding" / "grounding.json"),
            "--grounding-images", str(tiny.dataset_dir / layout.DATASET / "train")]


def _train(tiny, out, *extra):
    return train_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                       "--out", str(out), "--device", "cpu", "--seed", str(SEED),
                       "--mode", "grounding", *SETS, *_grounding_args(tiny), *extra])


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _model(tiny, **overrides):
    cfg = make_config({**TINY_SETTINGS, "mode": "grounding", **overrides})
    vocab = load_vocabulary(text_parquet_path(tiny.dataset_dir, "tiny"))
    torch.manual_seed(0)
    model = OpenVocabDetector(cfg, vocab.dim)
    model.set_vocabulary(vocab.embeddings, vocab.is_base)
    model.attach_teacher(teacher_from_cache(DatasetCache(tiny.dataset_dir)))
    return model, vocab


def _fixed_batch(tiny, cfg):
    vocab = load_vocabulary(text_parquet_path(tiny.dataset_dir, "tiny"))
    loader = train_loader(tiny.shards, cfg, vocab.dim, vocab.base_labels(), seed=0,
                          num_workers=0)
    return next(iter(loader))


# ----------------------------------------------------------------------------- prompts


def test_caption_token_spans_decode_to_their_phrases():
    import open_clip

    tok = open_clip.tokenizer.SimpleTokenizer()
    tokenize = open_clip_tokenize(tok)
    for caption, phrases in (("a red circle next to two blue stars", ["red circle",
                                                                       "two blue stars"]),
                             ("Bow (weapon), tennis-racket and a bird.", ["Bow (weapon)",
                                                                           "tennis-racket",
                                                                           "bird"])):
        spans = [(caption.index(p), caption.index(p) + len(p)) for p in phrases]
        ids = [tok.sot_token_id, *tokenize(caption), tok.eot_token_id]
        got = caption_token_spans(caption, spans, tokenize)
        for (s, e), phrase in zip(got, phrases):
            decoded = tok.decode(ids[s:e]).replace(" ", "")
            want = phrase.lower().replace(" ", "")
            # the phrase's own tokens; a last one merged with the punctuation after it
            # ("),") is kept whole
            assert decoded == want or (phrase == "Bow (weapon)" and decoded == want + ","), \
                (decoded, phrase)
        assert got == sorted(got) and got[0][0] >= 1  # after start-of-text, in order
    positive = caption_positive("red circle and star", [[(0, 10)], [(15, 19)]], tokenize, 10)
    assert positive.tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]]


def test_iteration_kind_keeps_the_pair_draws_and_shares():
    cfg = make_config({"pairs_ratio": 0.3})
    assert [iteration_kind(1, i, cfg) == PAIRS for i in range(200)] == \
        [is_pair_iteration(1, i, 0.3) for i in range(200)]
    assert {iteration_kind(1, i, cfg) for i in range(200)} == {PAIRS, DETECTION}
    cfg = make_config({"mode": "grounding", "pairs_ratio": 0.3, "grounding_ratio": 0.4,
                       "pseudo_ratio": 0.2})
    kinds = [iteration_kind(1, i, cfg) for i in range(2000)]
    assert [k == PAIRS for k in kinds] == [is_pair_iteration(1, i, 0.3) for i in range(2000)]
    share = {k: kinds.count(k) / 2000 for k in (GROUNDING, PSEUDO)}
    assert share[GROUNDING] == pytest.approx(0.7 * 0.4, abs=0.04)
    assert share[PSEUDO] == pytest.approx(0.7 * 0.2, abs=0.04)
    for bad, msg in (({"grounding_ratio": 0.5}, "needs mode=grounding"),
                     ({"mode": "grounding", "grounding_ratio": 0.7, "pseudo_ratio": 0.4},
                      "<= 1"),
                     ({"mode": "grounding", "grounding_negatives": -1}, ">= 0")):
        with pytest.raises(ConfigError, match=msg):
            make_config(bad)


def test_focal_targets_tie_a_region_of_class_c_to_exactly_its_span(tiny, monkeypatch):
    model, _ = _model(tiny)
    labels = [torch.tensor([1, 3, 3]), torch.tensor([2])]
    prompts = detection_prompt_targets(labels, list(BASE), SEED, 5, 8, model.max_tokens,
                                       model.tokenize, model.context_length)
    # seeded per (seed, step, image): the same call gives the same prompts, another step not
    again = detection_prompt_targets(labels, list(BASE), SEED, 5, 8, model.max_tokens,
                                     model.tokenize, model.context_length)
    assert [[p.text for p in ps] for ps in prompts] == [[p.text for p in ps] for ps in again]
    name_ids = [list(model.tokenize(n)) for n in BASE]
    for lab, ps in zip(labels, prompts):
        assert len(ps) == 1  # three base names fit the 6 tokens
        text = ps[0].text
        tokens = list(model.tokenize(text))
        for g, c in enumerate(lab.tolist()):
            row = ps[0].positive[g]
            on = row.nonzero().flatten().tolist()
            assert [tokens[i - 1] for i in on] == name_ids[c - 1]  # exactly c's tokens
            assert row.sum() == len(name_ids[c - 1])
    # chunked (4 tokens a prompt: two names each): a box's row is set only in its chunk
    chunks = detection_prompt_targets(labels[:1], list(BASE), SEED, 5, 8, 4, model.tokenize,
                                      model.context_length)[0]
    assert len(chunks) == 2
    for g, c in enumerate(labels[0].tolist()):
        holding = [p for p in chunks if BASE[c - 1] in p.text.rstrip(".").split(". ")]
        assert len(holding) == 1
        assert [int(p.positive[g].sum()) for p in chunks] == [
            len(name_ids[c - 1]) if p is holding[0] else 0 for p in chunks]
    # through the model: a proposal matched to GT g of class c gets row g; background zeros
    seen = []
    real = model_module.sigmoid_focal_alignment_loss
    monkeypatch.setattr(model_module, "sigmoid_focal_alignment_loss",
                        lambda lg, t, m: seen.append(t) or real(lg, t, m))
    emb = [F.normalize(torch.randn(4, model.embed_dim), dim=-1),
           F.normalize(torch.randn(2, model.embed_dim), dim=-1)]
    matched = [torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0])]
    fg = [torch.tensor([1, 3, 3, 0]), torch.tensor([2, 0])]
    loss = model.grounding_loss(emb, matched, fg, prompts)
    assert torch.isfinite(loss)
    torch.testing.assert_close(seen[0][:3], prompts[0][0].positive[[0, 1, 2]])
    assert seen[0][3].sum() == 0 and seen[1][1].sum() == 0
    torch.testing.assert_close(seen[1][0], prompts[1][0].positive[0])


def test_last_token_span_trains_only_each_phrases_last_token(tiny, monkeypatch):
    model, _ = _model(tiny)
    model.cfg = dataclasses.replace(model.cfg, grounding_span="last")
    labels = [torch.tensor([1, 3])]
    names = [f"small {n}" for n in BASE]  # two tokens each (the tiny vocabulary has one)
    prompts = detection_prompt_targets(labels, names, SEED, 5, 8, model.max_tokens,
                                       model.tokenize, model.context_length)
    seen = []
    real = model_module.sigmoid_focal_alignment_loss
    monkeypatch.setattr(model_module, "sigmoid_focal_alignment_loss",
                        lambda lg, t, m: seen.append(t) or real(lg, t, m))
    emb = [F.normalize(torch.randn(3, model.embed_dim), dim=-1)]
    model.grounding_loss(emb, [torch.tensor([0, 1, 0])], [torch.tensor([1, 3, 0])], prompts)
    full = prompts[0][0].positive
    for g in (0, 1):
        span = full[g].nonzero().flatten().tolist()
        assert seen[0][g].nonzero().flatten().tolist() == [span[-1]]
    assert seen[0][2].sum() == 0  # background
    assert all(len(full[g].nonzero()) == 2 for g in (0, 1))  # GLIP's span: both tokens


def test_one_name_per_training_prompt_targets_and_trainer_setting(tiny, tmp_path, monkeypatch):
    model, _ = _model(tiny)
    labels = [torch.tensor([1, 3, 3])]
    single = detection_prompt_targets(labels, list(BASE), SEED, 5, 2, model.max_tokens,
                                      model.tokenize, model.context_length,
                                      names_per_prompt=1)[0]
    assert single and all(p.text.count(".") == 1 for p in single)  # one name each
    name_ids = [list(model.tokenize(n)) for n in BASE]
    for g, c in enumerate(labels[0].tolist()):  # a box's row is set in its name's prompt only
        assert [int(p.positive[g].sum()) for p in single] == [
            len(name_ids[c - 1]) if p.text == BASE[c - 1] + "." else 0 for p in single]
    # the trainer passes TrainConfig.grounding_train_names through
    import ovdistill.trainer.train as train_module

    seen = []
    real = train_module.detection_prompt_targets
    monkeypatch.setattr(train_module, "detection_prompt_targets",
                        lambda *a, **k: seen.append(a[7:] + tuple(k.values())) or real(*a, **k))
    assert _train(tiny, tmp_path / "single", "--steps", "1",
                  "--set", "grounding_train_names=1") == 0
    assert seen and seen[0][-1] == 1


def test_loss_is_finite_and_decreases_on_a_fixed_batch(tiny):
    model, _ = _model(tiny)
    images, targets = _fixed_batch(tiny, model.cfg)
    prompts = detection_prompt_targets([t["labels"] for t in targets], list(BASE), SEED, 0,
                                       2, model.max_tokens, model.tokenize,
                                       model.context_length)
    # backbone and RPN held still, so the proposals (and, seeded, their sample) are fixed:
    # what moves is the grounding path (tower, token projection, alignment)
    for part in (model.backbone, model.rpn):
        part.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=3e-5)
    model.train()
    seen = []
    for _ in range(8):
        torch.manual_seed(1)  # the same proposal sample each step, as far as the RPN allows
        losses = model(images, targets, prompts=prompts)
        assert "loss_text" not in losses and {"loss_grounding", "loss_box_reg"} <= set(losses)
        assert torch.isfinite(losses["loss_grounding"])
        seen.append(float(losses["loss_grounding"].detach()))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert seen[-1] < 0.8 * seen[0] and seen == sorted(seen, reverse=True), seen
    # the frozen teacher got no gradient and is not part of the state dict
    assert not any(k.startswith("text_encoder") for k in model.state_dict())
    assert {"token_proj.proj.weight", "alignment.bias", "alignment.log_scale"} <= set(
        model.state_dict())


def test_a_fusion_layer_changes_the_logits(tiny):
    model, _ = _model(tiny, fusion_layers=1, fusion_heads=2)
    tokens, mask = model.encode_prompts(["box. ball. bar.", "ring."])
    regions = [F.normalize(torch.randn(5, model.embed_dim), dim=-1)] * 2
    with torch.no_grad():
        for p in model.fusion.parameters():
            if p.ndim == 1 and p.shape[0] == model.embed_dim and float(p.mean()) == 1e-4:
                p.fill_(0.5)  # the gammas: a visible step away from the identity
        fused = model.alignment_scores(regions, tokens, mask)
        layers, model.fusion.layers = model.fusion.layers, torch.nn.ModuleList()
        plain = model.alignment_scores(regions, tokens, mask)
        model.fusion.layers = layers
    assert [tuple(f.shape) for f in fused] == [(5, CONTEXT)] * 2
    assert not torch.allclose(fused[0], plain[0])
    # the text tokens of one prompt change the other prompt's regions not at all
    torch.testing.assert_close(
        model.alignment_scores([regions[0]], tokens[:1], mask[:1])[0], fused[0])


# ----------------------------------------------------------------------------- runs


def test_training_grounding_data_and_resume(tiny, tmp_path, capsys):
    """4 steps of detection, grounding and pseudo-grounding iterations (the pseudo file: the
    same hand-written json through --pseudo-file), cut at step 2 and resumed."""
    cfg = make_config({"mode": "grounding", "grounding_ratio": 0.4, "pseudo_ratio": 0.3})
    pattern = [iteration_kind(SEED, i, cfg) for i in range(4)]
    assert {PSEUDO, DETECTION, GROUNDING} <= set(pattern)
    run = tmp_path / "g"
    pseudo = ["--pseudo-file", str(tiny.root / "grounding" / "grounding.json"),
              "--pseudo-images", str(tiny.dataset_dir / layout.DATASET / "train"),
              "--set", "grounding_ratio=0.4", "--set", "pseudo_ratio=0.3"]
    assert _train(tiny, run, "--steps", "4", "--stop-at", "2", *pseudo,
                  "--set", "grounding_negatives=1") == 0
    assert "grounding: teacher gl-tiny-clip (context 8" in capsys.readouterr().out
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and not any(k.startswith("text_encoder") for k in ckpt["model"])
    assert ckpt["teacher"]["sha256"] == teacher_from_cache(
        DatasetCache(tiny.dataset_dir)).identity["sha256"]
    assert _train(tiny, run, "--resume", "latest", *pseudo[:4]) == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r, kind in zip(rows, pattern):
        assert np.isfinite(r["loss_grounding"]) and r["loss_grounding"] > 0
        assert "loss_text" not in r
        assert ("grounding_skipped" in r) == (kind in (GROUNDING, PSEUDO))
        if kind != DETECTION:
            assert r["grounding_skipped"] == 0
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 4


def test_grounding_stream_batches(tiny):
    cfg = make_config({**TINY_SETTINGS, "mode": "grounding"})
    model, _ = _model(tiny)
    stream = GroundingStream.from_file(tiny.root / "grounding" / "grounding.json",
                                       tiny.dataset_dir / layout.DATASET / "train", cfg,
                                       model.tokenize, model.max_tokens, model.context_length,
                                       seed=0)
    images, targets, prompts, skipped = next(stream)
    assert len(images) == cfg.batch_size and skipped == 0
    for im, t, ps in zip(images, targets, prompts):
        assert min(im.shape[-2:]) in cfg.train_sizes
        assert len(t["boxes"]) == len(t["labels"]) == ps[0].positive.shape[0] >= 1
        assert (ps[0].positive.sum(1) >= 1).all()
        assert " and " in ps[0].text or ps[0].text in BASE
    # grounding_span "eot": the same images, one prompt per phrase, every box in one of them
    cfg = make_config({**TINY_SETTINGS, "mode": "grounding", "grounding_span": "eot",
                       "grounding_train_names": 1})
    stream = GroundingStream.from_file(tiny.root / "grounding" / "grounding.json",
                                       tiny.dataset_dir / layout.DATASET / "train", cfg,
                                       model.tokenize, model.max_tokens, model.context_length,
                                       seed=0)
    eot_images, eot_targets, eot_prompts, _ = next(stream)
    for im, t, ps, caption in zip(eot_images, eot_targets, eot_prompts, prompts):
        assert sum(p.positive.any(1).long() for p in ps).tolist() == [1] * len(t["boxes"])
        assert all(p.text.endswith(".") and p.text[:-1] in caption[0].text for p in ps)
        assert len({p.text for p in ps}) == len(ps)


def _reference_scores(model, teacher, names, emb, last=False, eot=False):
    """Each name's score by another path: its own prompt's tokens found by searching the
    name's ids, the mean sigmoid over them (last: the sigmoid of the last of them; eot: of
    the token after the prompt's ids). emb: Tensor[N, D] -> Tensor[N, C]."""
    want = torch.zeros(len(emb), len(names))
    with torch.no_grad():
        for prompt in model.class_prompts:
            feats, mask = teacher.encode_tokens([prompt.text])
            tokens = model.token_proj(feats)[0]
            fused, tokens = model.fusion(emb[None], tokens[None], mask)
            cos = F.normalize(fused[0], dim=-1) @ F.normalize(tokens[0], dim=-1).t()
            logits = cos / model.alignment.log_scale.exp() + model.alignment.bias
            ids = [None, *model.tokenize(prompt.text)]
            for c in prompt.classes:
                name = list(model.tokenize(names[c]))
                at = next(i for i in range(1, len(ids)) if ids[i:i + len(name)] == name)
                first = at + len(name) - 1 if last else at
                want[:, c] = torch.sigmoid(logits[:, first:at + len(name)]).mean(1)
                if eot:
                    want[:, c] = torch.sigmoid(logits[:, len(ids)])
    return want


def test_evaluate_scores_the_mean_sigmoid_over_each_span(tiny, tmp_path):
    run = tmp_path / "ev"
    assert _train(tiny, run, "--steps", "2", "--set", "fusion_layers=1",
                  "--set", "fusion_heads=2", "--set", "grounding_eval_names=0") == 0
    dataset_cache = tiny.dataset_dir
    from ovdistill.pipeline.manifests import load_manifest

    dataset = load_manifest(str(tiny.manifest), cache_root=str(tiny.cache))
    model, _, vocab = load_run(run / "latest.pt", dataset, dataset_cache,
                                  torch.device("cpu"))
    names = list(vocab.names)
    assert [p.classes for p in model.class_prompts] == [(0, 1, 2), (3,)]  # chunked: 6 tokens
    emb = [F.normalize(torch.randn(7, model.embed_dim), dim=-1)]
    got = model.grounding_scores(emb)[0]
    assert len(model._prompt_cache) == 2
    model.grounding_scores(emb)
    assert len(model._prompt_cache) == 2  # encoded once
    teacher = teacher_from_cache(DatasetCache(dataset_cache))
    torch.testing.assert_close(got, _reference_scores(model, teacher, names, emb[0]),
                               atol=1e-5, rtol=1e-5)
    # the whole evaluation: the usual AP file, with the prompts it put to the text encoder
    assert eval_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                      "--run", str(run), "--device", "cpu"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["mode"] == "grounding" and "AP50_novel" in result
    assert set(result["AP50_per_class"]) == set(BASE + NOVEL)
    assert result["prompts"] == [p.text for p in model.class_prompts]
    # another split's result is written beside val's, not over it
    val_text = (run / "eval.json").read_text()
    assert eval_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                      "--run", str(run), "--device", "cpu", "--split", "train",
                      "--max-images", "2"]) == 0
    assert (run / "eval.json").read_text() == val_text
    assert json.loads((run / "eval_train.json").read_text())["n_images"] == 2

    # grounding_eval_names=1 (the default): one prompt per name, so a name's score no longer
    # depends on the names beside it in its chunk
    model.cfg = dataclasses.replace(model.cfg, grounding_eval_names=1)
    model.set_class_prompts(names)
    assert [p.classes for p in model.class_prompts] == [(0,), (1,), (2,), (3,)]
    single = model.grounding_scores(emb)[0]
    torch.testing.assert_close(single, _reference_scores(model, teacher, names, emb[0]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single[:, 3], got[:, 3])  # (3,) was a prompt of its own already
    assert (single[:, :3] - got[:, :3]).abs().max() > 1e-3  # the context changed 0..2
    # grounding_span "last": each name scored by its last token alone (names of two tokens)
    two = [f"small {n}" for n in names]
    model.set_class_prompts(two)
    mean = model.grounding_scores(emb)[0]
    model.cfg = dataclasses.replace(model.cfg, grounding_span="last")
    last = model.grounding_scores(emb)[0]
    torch.testing.assert_close(last, _reference_scores(model, teacher, two, emb[0], True),
                               atol=1e-5, rtol=1e-5)
    assert (last - mean).abs().max() > 1e-3
    # grounding_span "eot": each name scored by its own prompt's end-of-text token
    model.cfg = dataclasses.replace(model.cfg, grounding_span="eot")
    eot = model.grounding_scores(emb)[0]
    torch.testing.assert_close(eot, _reference_scores(model, teacher, two, emb[0], eot=True),
                               atol=1e-5, rtol=1e-5)
    assert (eot - last).abs().max() > 1e-3


def test_detect_scores_the_given_names_prompts(tiny, tmp_path):
    """`trainer.detect` on a grounding run: the classes asked for are the prompts scored
    (not the run's vocabulary), equal to the model called directly on those prompts."""
    from ovdistill.pipeline.images import load_rgb
    from ovdistill.pipeline.manifests import load_manifest
    from ovdistill.trainer import detect
    from ovdistill.trainer.data import resize_for_test

    run = tmp_path / "det"
    assert _train(tiny, run, "--steps", "2", "--set", "score_thresh=0.0") == 0
    image = sorted((tiny.dataset_dir / layout.DATASET / "val").glob("*.jpg"))[0]
    classes = ["ring", "box"]  # novel first: not the run's vocabulary order (box, ball, ...)
    assert detect.main(["--run", str(run), "--cache", str(tiny.cache), "--manifest",
                        str(tiny.manifest), "--device", "cpu", "--out", str(tmp_path / "d.png"),
                        "--image", str(image), "--classes", ",".join(classes),
                        "--score", "0.0"]) == 0
    got = [(a["category"], a["score"])
           for a in json.loads((tmp_path / "d.json").read_text())["annotations"]]
    dataset = load_manifest(str(tiny.manifest), cache_root=str(tiny.cache))
    model, _, _ = load_run(run / "latest.pt", dataset, tiny.dataset_dir, torch.device("cpu"))
    model.set_class_prompts(classes)
    assert [p.text for p in model.class_prompts] == ["ring.", "box."]
    pixels = torch.from_numpy(np.array(load_rgb(image))).permute(2, 0, 1).contiguous()
    resized, _ = resize_for_test(pixels, model.cfg.test_size, model.cfg.max_size)
    det = model.detect([resized])[0]
    want = [(classes[c], round(s, 5)) for s, c in zip(det.scores.tolist(), det.labels.tolist())]
    assert want and got == want


def test_another_teacher_is_refused_in_one_line(tiny, tmp_path, capsys):
    run = tmp_path / "t"
    assert _train(tiny, run, "--steps", "1") == 0
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    ckpt["teacher"] = {**ckpt["teacher"], "sha256": "f" * 64}
    torch.save(ckpt, run / "other.pt")
    capsys.readouterr()
    assert eval_main(["--manifest", str(tiny.manifest), "--cache", str(tiny.cache),
                      "--run", str(run), "--checkpoint", str(run / "other.pt"),
                      "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with teacher gl-tiny-clip sha256 ffffffffffff" in err[0]


def test_train_text_encoder_saves_and_trains_it(tiny, tmp_path):
    run = tmp_path / "tt"
    assert _train(tiny, run, "--steps", "1", "--set", "train_text_encoder=true") == 0
    state = torch.load(run / "latest.pt", weights_only=True)["model"]
    teacher = teacher_from_cache(DatasetCache(tiny.dataset_dir))
    key = "text_encoder.token_embedding.weight"
    assert key in state
    assert not torch.equal(state[key], teacher.model.state_dict()["token_embedding.weight"])


def test_phrase_prompts_make_one_prompt_per_phrase(tiny):
    """grounding_span "eot": a caption's phrases become prompts of their own; boxes that
    point at the same phrase share its prompt, a box with two spans joins them."""
    model, _ = _model(tiny)
    caption = "two boxes and a ball on a bar"
    spans = [[(4, 9)], [(4, 9)], [(16, 20)], [(0, 3), (26, 29)]]
    prompts = phrase_prompts(caption, spans, model.tokenize, model.context_length)
    assert [p.text for p in prompts] == ["boxes.", "ball.", "two bar."]
    n_ids = [len(list(model.tokenize(t[:-1]))) for t in ("boxes.", "ball.", "two bar.")]
    for p, rows, n in zip(prompts, ([0, 1], [2], [3]), n_ids):
        want = torch.zeros(4, model.context_length)
        want[rows, 1:1 + n] = 1.0
        assert torch.equal(p.positive, want)


def test_eot_grounding_trains_each_box_on_its_prompts_end_of_text(tiny, monkeypatch):
    """With grounding_span "eot" the focal loss's only positive token of a box is the
    end-of-text token of its class's one-name prompt; the option needs one name a prompt."""
    with pytest.raises(ConfigError, match=r"grounding_train_names and grounding_eval_names "
                       r"must be 1 \(got 0, 1\)$"):
        make_config({**TINY_SETTINGS, "mode": "grounding", "grounding_span": "eot"})
    model, _ = _model(tiny, grounding_span="eot", grounding_train_names=1)
    labels = [torch.tensor([1, 3])]
    prompts = detection_prompt_targets(labels, list(BASE), SEED, 5, 8, model.max_tokens,
                                       model.tokenize, model.context_length, 1)
    seen = []
    real = model_module.sigmoid_focal_alignment_loss
    monkeypatch.setattr(model_module, "sigmoid_focal_alignment_loss",
                        lambda lg, t, m: seen.append((t, m)) or real(lg, t, m))
    emb = [F.normalize(torch.randn(3, model.embed_dim), dim=-1)]
    model.grounding_loss(emb, [torch.tensor([0, 1, 0])], [torch.tensor([1, 2, 0])],
                         prompts)
    assert len(seen) == len(prompts[0]) >= 2
    for p, (target, mask) in zip(prompts[0], seen):
        eot = int(mask.sum()) - 1
        has = p.positive.sum(1) > 0  # which GT boxes this prompt names
        want = torch.zeros_like(target)
        for n, g in enumerate([0, 1, 0]):
            if n < 2 and has[g]:  # proposal 2 is background
                want[n, eot] = 1.0
        assert torch.equal(target, want)
    assert sum(float(t.sum()) for t, _ in seen) == 2  # two foreground proposals, one token each
