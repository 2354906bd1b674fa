"""Composition (encoder -> grouping -> projector -> LM), freezing, caching, checkpoints and the med-vqa recipe on
tiny timm encoders and tiny LLMs."""

from __future__ import annotations

import json

import pytest
import torch

from modaltune.shared.compose import group_tokens, splice
from modaltune.shared.config import ConfigError, from_dict
from modaltune.shared.loss import unwrap_peft
from modaltune.vision.vqa import load_vqa_sets


def _cfg(tiny_llm, vqa_files, *extra):
    from modaltune.recipes.med_vqa import MedVQAConfig
    from modaltune.shared.config import apply_dotted, parse_overrides

    base = {"stages": [{"name": "caption", "data": "caption"}, {"name": "vqa", "data": "vqa"}], "encoder": {"kind": "timm", "name": "test_efficientnet"}, "model": {"name": str(tiny_llm)},
            "data": {"layout": "jsonl", "train": str(vqa_files / "train.jsonl"),
                     "test": str(vqa_files / "test.jsonl")},
            "llm": {"r": 4, "alpha": 8}, "train": {"precision": "fp32", "batch_size": 4}}
    return from_dict(MedVQAConfig, apply_dotted(base, parse_overrides(list(extra)), "test"))


def _build(cfg, log=lambda *_: None):
    """The composed model a med-vqa config describes, built by the library (as the recipe does)."""
    from modaltune.shared.compose import build_composed_lm

    return build_composed_lm(encoder=cfg.encoder, encoder_tuning=cfg.encoder_tuning,
                             model=cfg.model, llm=cfg.llm, projector=cfg.projector,
                             label_logits_only=cfg.train.label_logits_only,
                             gradient_checkpointing=cfg.train.gradient_checkpointing, log=log)


def _dataset(rows, tok, cache, *, max_length=128, skipped=None):
    from modaltune.shared.compose_data import ComposedDataset
    from modaltune.shared.skips import Skips
    from modaltune.vision.data import PLACEHOLDER

    return ComposedDataset(rows, tok, cache, placeholder=PLACEHOLDER, max_length=max_length,
                           skipped=Skips() if skipped is None else skipped)


def _collator(tok, encoder=None, **kwargs):
    from modaltune.vision.vqa import image_collator

    return image_collator(tok, encoder, **kwargs)


def _cache(encoder, depth=None):
    from modaltune.vision.vqa import image_cache

    return image_cache(encoder, depth=depth, precision="fp32")


def _anchor(cfg, model, tok, raw):
    from modaltune.shared.compose import anchor_on_text

    texts = [it.caption for it in raw["caption_train"]] + [t for it in raw["vqa_train"] for t in (it.question, it.answer)]
    return anchor_on_text(model, tok, texts, cfg.projector.anchor_words, log=lambda *_: None)


def test_grouping_pads_or_trims():
    x = torch.arange(2 * 49 * 3, dtype=torch.float).view(2, 49, 3)
    assert group_tokens(x, 4, "pad").shape == (2, 13, 12)
    assert group_tokens(x, 4, "trim").shape == (2, 12, 12)
    g = group_tokens(x, 4, "trim")
    assert torch.equal(g[0, 1], x[0, 4:8].reshape(-1))  # 4 consecutive tokens concatenated
    assert torch.equal(group_tokens(x, 4, "pad")[0, -1, 3:], torch.zeros(9))


@pytest.mark.parametrize("left", [False, True])
def test_splice_keeps_text_and_padding_in_place(left):
    emb = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    if left:
        mask[1, :2] = 0
    else:
        mask[1, 3:] = 0
    pos = torch.tensor([1, 3 if left else 1])
    vis = torch.randn(2, 3, 8)
    e, m, lab = splice(emb, mask, torch.zeros(2, 5, dtype=torch.long), pos, vis)
    assert e.shape == (2, 7, 8) and m.shape == lab.shape == (2, 7)
    assert torch.equal(e[0, 1:4], vis[0]) and torch.equal(e[0, 4:], emb[0, 2:])
    assert (lab[1, pos[1]: pos[1] + 3] == -100).all()
    assert int(m[1].sum()) == int(mask[1].sum()) + 2
    if left:
        assert m[1, :2].sum() == 0
    else:
        assert m[1, -2:].sum() == 0


@pytest.mark.parametrize("encoder", ["test_vit", "test_efficientnet"])
@pytest.mark.parametrize("llm", ["tiny_llama", "tiny_gemma"])
def test_composed_step_trains_only_projector_and_lora(encoder, llm, request, vqa_files):
    from modaltune.vision.vqa import vqa_rows
    from modaltune.vision.data import read_vqa_jsonl

    cfg = _cfg(request.getfixturevalue(llm), vqa_files, f"encoder.name={encoder}")
    model, tok, _ = _build(cfg)
    items, _ = read_vqa_jsonl(str(vqa_files / "train.jsonl"))
    from collections import Counter

    ds = _dataset(vqa_rows(items[:4]), tok, None, max_length=128, skipped=Counter())
    batch = _collator(tok, model.encoder)([ds[i] for i in range(4)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    loss = model(**batch)["loss"]
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {model.component_of(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"projector", "llm"}
    enc = [n for n, _ in model.named_parameters() if model.component_of(n) == "encoder"]
    assert enc and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in enc)
    assert not any("lora" not in n for n in model.trained_names if model.component_of(n) == "llm")


def test_cached_features_give_the_same_loss_and_checkpoint_round_trip(tiny_llama, vqa_files, tmp_path):
    from collections import Counter

    from modaltune.shared import checkpoint as ckpt
    from modaltune.vision.data import read_vqa_jsonl
    from modaltune.vision.vqa import vqa_rows

    cfg = _cfg(tiny_llama, vqa_files, "projector.norm=rms")
    model, tok, _ = _build(cfg)
    items, _ = read_vqa_jsonl(str(vqa_files / "train.jsonl"))
    rows = vqa_rows(items[:4])
    cache = _cache(model.encoder)
    cache.fill([r["image"] for r in rows])
    assert cache.computed == len({r["image"] for r in rows})
    cached = _dataset(rows, tok, cache, max_length=128, skipped=Counter())
    plain = _dataset(rows, tok, None, max_length=128, skipped=Counter())
    model.eval()
    with torch.no_grad():
        a = model(**_collator(tok)([cached[i] for i in range(4)]))["loss"]
        b = model(**_collator(tok, model.encoder)([plain[i] for i in range(4)]))["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)

    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ckpt.save_checkpoint(model, tmp_path / "c", meta={"recipe": "med-vqa"})
    fresh, _, _ = _build(cfg)
    fresh.eval()
    batch = _collator(tok)([cached[i] for i in range(4)])
    with torch.no_grad():
        ckpt.load_trained(fresh, tmp_path / "c")
        assert torch.equal(model(**batch)["loss"], fresh(**batch)["loss"])

    saved = set(ckpt.read_trained(tmp_path / "c"))
    assert {k for k in saved if k.startswith("projector.")} == {"projector.inner.weight", "projector.inner.bias",
                                                                  "projector.norm.weight"}
    assert all(k.startswith(("projector.", "llm.")) for k in saved)


def test_word_anchored_projector_mixes_the_llms_own_word_embeddings(tiny_gemma, vqa_files, tmp_path):
    """projector.norm=words: anchors are the training text's most frequent tokens; every visual token is a convex
    mixture of their (Gemma-scaled) embeddings; the anchors travel in the checkpoint and reload."""
    from modaltune.shared import checkpoint as ckpt

    cfg = _cfg(tiny_gemma, vqa_files, "projector.norm=words", "projector.anchor_words=64")
    model, tok, _ = _build(cfg)
    raw, _ = load_vqa_sets(cfg.data)
    ids = _anchor(cfg, model, tok, raw)
    assert len(ids) == 64 and not set(ids) & set(tok.all_special_ids)
    answer = tok(" " + raw["vqa_train"][0].answer, add_special_tokens=False)["input_ids"][0]
    assert answer in ids  # answers are among the training text's frequent tokens
    words = model.llm.get_input_embeddings()(torch.tensor(ids)).float()
    assert torch.allclose(model.projector.words, words)
    feats = torch.randn(2, 49, model.encoder.out_dim)
    with torch.no_grad():
        tokens = model.prefix_tokens(features=feats)  # (2, 13, D): convex mixtures, inside the anchors' box
        assert bool((tokens >= words.min(0).values - 1e-4).all() and (tokens <= words.max(0).values + 1e-4).all())
        assert tokens.std(1).mean() > 0  # tokens differ with the image content
        model.projector.inner.weight.mul_(1e4)  # a confident projector picks single words
        sharp = model.prefix_tokens(features=feats).reshape(-1, words.size(1))
        nearest = torch.cdist(sharp, words).min(-1).values
        assert bool((nearest < 1e-3 * words.norm(dim=-1).mean()).all())
    assert "projector.words" in model.trained_state_dict()

    ckpt.save_checkpoint(model, tmp_path / "c", meta={"recipe": "med-vqa"})
    fresh, _, _ = _build(cfg)
    assert not fresh.projector.words.any()
    ckpt.load_trained(fresh, tmp_path / "c")
    assert torch.equal(fresh.projector.words, model.projector.words)


def test_both_projector_gives_word_tokens_then_feature_tokens(tiny_gemma, vqa_files, tmp_path):
    """projector.norm=both: 2 x 13 tokens per image, the first 13 word mixtures, the last 13 at word RMS; the
    composed model splices all of them and its checkpoint round-trips."""
    from modaltune.shared import checkpoint as ckpt
    from modaltune.shared.compose import embedding_rms
    from modaltune.vision.vqa import vqa_rows

    cfg = _cfg(tiny_gemma, vqa_files, "projector.norm=both", "projector.anchor_words=16")
    model, tok, _ = _build(cfg)
    raw, _ = load_vqa_sets(cfg.data)
    _anchor(cfg, model, tok, raw)
    words = model.projector.words.words
    feats = torch.randn(2, 49, model.encoder.out_dim)
    with torch.no_grad():
        tokens = model.prefix_tokens(features=feats)
    assert tokens.shape == (2, 26, words.size(1))
    low, high = words.min(0).values - 1e-4, words.max(0).values + 1e-4
    assert bool((tokens[:, :13] <= high).all() and (tokens[:, :13] >= low).all())
    rms = tokens[:, 13:].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, embedding_rms(model.llm)), rtol=1e-3)

    from collections import Counter

    cache = _cache(model.encoder)  # the encoder is random here: a fresh build's would differ
    rows = vqa_rows(raw["vqa_train"][:3])
    cache.fill([r["image"] for r in rows])
    ds = _dataset(rows, tok, cache, max_length=128, skipped=Counter())
    batch = _collator(tok)([ds[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        loss = model(**batch)["loss"]
        ckpt.save_checkpoint(model, tmp_path / "c", meta={"recipe": "med-vqa"})
        fresh, _, _ = _build(cfg)
        fresh.eval()
        ckpt.load_trained(fresh, tmp_path / "c")
        assert torch.equal(fresh(**batch)["loss"], loss)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_normed_projector_puts_visual_tokens_at_word_scale(kind, tiny_gemma, vqa_files):
    """projector.norm=rms: every projected token has the RMS of the LLM's own (Gemma-scaled) input embeddings,
    however large the encoder features are, and the scale trains; norm=none keeps the raw projector output."""
    from modaltune.shared.compose import embedding_rms

    cfg = _cfg(tiny_gemma, vqa_files, f"projector.kind={kind}", "projector.norm=rms")
    model, tok, _ = _build(cfg)
    emb = model.llm.get_input_embeddings()
    raw_rms = emb.weight.detach().float().pow(2).mean(-1).sqrt().mean().item()
    scale = float(emb.embed_scale)  # Gemma multiplies looked-up embeddings by sqrt(hidden)
    assert scale > 2
    assert embedding_rms(model.llm) == pytest.approx(raw_rms * scale, rel=0.05)
    feats = 1000.0 * torch.randn(3, 49, model.encoder.out_dim)
    tokens = model.prefix_tokens(features=feats)  # (3, 13, D)
    rms = tokens.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, embedding_rms(model.llm)), rtol=1e-3)
    assert model.projector.norm.weight.requires_grad
    assert "projector.norm.weight" in model.trained_names

    raw, _, _ = _build(_cfg(tiny_gemma, vqa_files, f"projector.kind={kind}", "projector.norm=none"))
    assert raw.prefix_tokens(features=feats).pow(2).mean(-1).sqrt().min() > 10 * rms.max()
    with pytest.raises(ConfigError, match="norm: 'layer' is not one of 'none', 'rms', 'words', 'both'"):
        _cfg(tiny_gemma, vqa_files, "projector.norm=layer")


@pytest.mark.parametrize("encoder", ["test_vit", "test_efficientnet"])
def test_top_encoder_block_trains_over_cached_lower_blocks(encoder, tiny_llama, vqa_files):
    """encoder_tuning.layers=[-1]: LoRA on the top block only, the input of that block is cached, and the cached
    path gives the loss and the encoder gradients of the uncached one; BatchNorm statistics never move."""
    from collections import Counter

    from modaltune.vision.data import read_vqa_jsonl
    from modaltune.vision.vqa import vqa_rows

    targets = "[qkv,proj,fc1,fc2]" if encoder == "test_vit" else "[conv_pw,conv_pwl]"
    cfg = _cfg(tiny_llama, vqa_files, f"encoder.name={encoder}", "encoder_tuning.method=lora",
               "encoder_tuning.layers=[-1]", f"encoder_tuning.targets={targets}", "encoder_tuning.r=4",
               "stages[1].components=[encoder,projector,llm]", "llm.dropout=0.0")
    model, tok, _ = _build(cfg)
    base = unwrap_peft(model.encoder)
    n_blocks = len(base.model.blocks)
    enc_trained = [n for n in model.trained_names if model.component_of(n) == "encoder"]
    assert enc_trained and all(f"blocks.{n_blocks - 1}." in n for n in enc_trained)
    assert unwrap_peft(model.encoder).cache_depth() == n_blocks - 1
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    items, _ = read_vqa_jsonl(str(vqa_files / "train.jsonl"))
    rows = vqa_rows(items[:4])
    cache = _cache(model.encoder, depth=n_blocks - 1)
    cache.fill([r["image"] for r in rows])
    assert not cache.complete
    cached = _collator(tok)([_dataset(rows, tok, cache, max_length=128, skipped=Counter())[i]
                                           for i in range(4)])
    plain = _collator(tok, model.encoder)([_dataset(rows, tok, None)[i] for i in range(4)])
    assert cached["features_depth"] == n_blocks - 1
    buffers = {n: b.clone() for n, b in model.encoder.named_buffers()}
    model.train()
    assert not model.encoder.training  # a LoRA-tuned encoder keeps its normalisation statistics
    out = []
    for batch in (cached, plain):
        model.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.requires_grad and model.component_of(n) == "encoder"}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-4)
    assert out[0][1] and out[0][1].keys() == out[1][1].keys()
    for name, g in out[0][1].items():
        assert torch.allclose(g, out[1][1][name], rtol=1e-3, atol=1e-6), name
    assert all(torch.equal(b, buffers[n]) for n, b in model.encoder.named_buffers())
    assert type(base.model.blocks).__name__ in {"Sequential", "ModuleList"} and len(base.model.blocks) == n_blocks


def test_an_encoder_method_no_stage_trains_is_refused(tiny_llama, vqa_files):
    from modaltune.shared.errors import ConfigError

    with pytest.raises(ConfigError, match=r"encoder_tuning.method=lora, but no stage trains the encoder.*"
                                          r"stages\[1\].components=\[encoder,projector,llm\]"):
        _cfg(tiny_llama, vqa_files, "encoder_tuning.method=lora", "encoder_tuning.layers=[-1]",
             "stages[0].components=[projector,llm]", "stages[1].components=[projector,llm]")
    cfg = _cfg(tiny_llama, vqa_files, "encoder_tuning.method=lora", "stages[1].components=[encoder,projector,llm]")
    assert cfg.stages[1].components == ["encoder", "projector", "llm"]


def test_component_learning_rates(tiny_llama, vqa_files, tmp_path):
    from transformers import TrainingArguments

    from modaltune.shared.training import ModaltuneTrainer

    model, tok, _ = _build(_cfg(tiny_llama, vqa_files))
    trainer = ModaltuneTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=5e-4,
                                                                    use_cpu=True, report_to=[]),
                               component_lrs={"projector": 1e-3})
    groups = {g["component"]: g["lr"] for g in trainer.create_optimizer().param_groups}
    assert groups == {"projector": 1e-3, "llm": 5e-4}


def _tiny_run(out, llm, vqa_files, *extra) -> list[str]:
    """`modaltune run med-vqa` arguments for a tiny timm encoder and LLM on the tiny jsonl VQA set."""
    return ["run", "med-vqa", "--out", str(out), "encoder.kind=timm", "encoder.name=test_efficientnet",
            f"model.name={llm}", "data.layout=jsonl", f"data.train={vqa_files / 'train.jsonl'}",
            f"data.test={vqa_files / 'test.jsonl'}", "data.captions=null", "train.batch_size=4",
            "train.precision=fp32", "train.save_steps=2", "llm.r=4", *extra]


def test_recipe_runs_both_stages_and_reports(tiny_llama, vqa_files, tmp_path):
    from modaltune.shared.cli import main

    out = tmp_path / "run"
    # 6 new tokens: a random tiny LLM's near-tied logits part batched and single decoding further on
    assert main(_tiny_run(out, tiny_llama, vqa_files, "stages[0].max_steps=2", "stages[1].max_steps=3",
                          "eval.max_new_tokens=6")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    m = report["metrics"]
    assert set(m["before"]) == set(m["after"]) and "test/accuracy" in m["after"]
    assert "test/closed_accuracy" in m["after"] and "test/open_accuracy" in m["after"]
    assert report["model"]["feature_cache"] is True
    stages = [s["stage"] for s in report["training"]["stages"]]
    assert stages == ["vqa"]  # no caption data for the jsonl layout: stage 1 is skipped and said so
    assert (out / "closed_confusion.png").exists()
    assert report["items"] and {"question", "reference", "before", "after", "image"} <= set(report["items"][0])
    # accuracy is what the report's own rows give: each row's answer (after the last "Answer:") against its reference
    from modaltune.shared.metrics import normalize_answer
    from modaltune.vision.vqa import split_answer

    items = report["items"]
    for it in items:
        assert it["correct"] == (normalize_answer(split_answer(it["after"])[1]) == normalize_answer(it["reference"]))
    assert m["after"]["test/accuracy"] == sum(it["correct"] for it in items) / len(items)
    closed = [it["correct"] for it in items if it["type"] == "closed"]
    assert m["after"]["test/closed_accuracy"] == sum(closed) / len(closed)

    from transformers import AutoModel

    from modaltune.shared import checkpoint as ckpt

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(merged)]) == 0
    model = AutoModel.from_pretrained(str(merged))
    assert not any("lora" in n for n, _ in model.named_parameters())
    trained = ckpt.read_trained(out / "checkpoint")
    merged_proj = model.projector.state_dict()
    assert set(merged_proj) == {k.removeprefix("projector.") for k in trained if k.startswith("projector.")}
    assert all(torch.equal(v, trained["projector." + k]) for k, v in merged_proj.items())
    assert merged_proj["words.words"].any()  # the anchor words travel with the projector
    assert model.config.projector["group"] == 4 and model.config.placeholder == "<ImageHere>"

    from modaltune.shared.generate_cli import generate

    item = report["items"][0]  # `modaltune generate --input IMAGE` answers as the run did for that question
    said = generate(str(out / "checkpoint"), [item["question"]], str(vqa_files / item["image"]), log=lambda *_: None)
    assert said == [item["after"]]


def test_feature_cache_can_be_turned_off_or_kept_on_disk(tiny_llama, vqa_files, tmp_path):
    from modaltune.shared.cli import main

    common = ["encoder.kind=timm", "encoder.name=test_efficientnet", f"model.name={tiny_llama}", "data.layout=jsonl",
              f"data.train={vqa_files / 'train.jsonl'}", f"data.test={vqa_files / 'test.jsonl'}",
              "stages[0].max_steps=1", "stages[1].max_steps=2", "train.batch_size=4", "train.precision=fp32",
              "llm.r=4", "eval.max_new_tokens=2"]
    assert main(["run", "med-vqa", "--out", str(tmp_path / "off"), "cache.mode=off", *common]) == 0
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    assert report["model"]["feature_cache"] is False  # the encoder ran on every step and pass
    disk = tmp_path / "states"
    assert main(["run", "med-vqa", "--out", str(tmp_path / "disk"), f"cache.dir={disk}", *common]) == 0
    files = list(disk.glob("*/*.safetensors"))
    assert len(files) == 6  # one per distinct image of the question files, under the encoder's fingerprint


def test_missing_images_are_counted_skips(tiny_llama, vqa_files, tmp_path):
    from modaltune.shared.cli import main

    rows = [json.loads(x) for x in (vqa_files / "train.jsonl").read_text().splitlines()]
    rows.append({"image": "images/nope.png", "question": "What color?", "answer": "red"})
    bad = vqa_files / "with_missing.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "r"
    assert main(["run", "med-vqa", "--out", str(out), "encoder.kind=timm", "encoder.name=test_efficientnet",
                 f"model.name={tiny_llama}", "data.layout=jsonl", f"data.train={bad}",
                 f"data.test={vqa_files / 'test.jsonl'}", "stages[0].max_steps=1", "stages[1].max_steps=1",
                 "train.batch_size=4", "train.precision=fp32", "llm.r=4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["vqa_train"]["skip_reasons"].get("missing image") == 1


def test_closed_questions_are_balanced_by_presence_or_answer():
    import random
    from collections import Counter

    from modaltune.vision.vqa import balance_closed as _balance_closed
    from modaltune.vision.data import VQAItem
    from modaltune.vision.vqa import closed_class as _cc

    def item(q, a, t="closed"):
        return VQAItem(id=q + a, image="x.png", question=q, answer=a, answer_type=t)

    def closed_class(it, mode):
        return _cc(it.question, it.answer, it.answer_type, mode)

    assert closed_class(item("is there a red shape?", "yes"), "presence") == "present"
    assert closed_class(item("is there not a red shape?", "no"), "presence") == "present"
    assert closed_class(item("is no circle present?", "yes"), "presence") == "absent"
    assert closed_class(item("does the image not contain a circle?", "yes"), "presence") == "absent"
    assert closed_class(item("isn't the lung clear?", "no"), "presence") == "present"
    assert closed_class(item("what colour?", "red", "open"), "presence") is None
    assert closed_class(item("is there a red shape?", "no"), "answer") == "no"
    items = ([item(f"is there a shape {i}?", "no") for i in range(8)] + [item(f"is there a dot {i}?", "yes") for i in
             range(2)] + [item(f"what is {i}?", "red", "open") for i in range(5)])
    from modaltune.shared.skips import Skips

    skipped = Skips()
    out = _balance_closed(items, "presence", random.Random(0), skipped)
    classes = Counter(closed_class(i, "presence") for i in out)
    assert classes == {"present": 2, "absent": 2, None: 5} and skipped.capped == {"balance_closed=presence": 6}
    assert not skipped  # left out on purpose: counted as capped, not as skipped
    assert _balance_closed(items, "none", random.Random(0), Skips()) == items


def test_balanced_closed_accuracy_exposes_the_never_look_shortcut():
    from modaltune.vision.vqa import vqa_metrics

    qs = [("is there a red shape?", "no"), ("is there a blue shape?", "no"), ("is there a green shape?", "yes"),
          ("is there not a red shape?", "yes"), ("is there not a green shape?", "no")]
    rows = [{"id": str(i), "image": "x.png", "question": q, "target": a, "type": "closed"} for i, (q, a) in
            enumerate(qs)]
    never_look = ["no" if " not " not in q else "yes" for q, _ in qs]  # always "the thing is absent"
    m, _ = vqa_metrics(rows, never_look)
    assert m["closed_accuracy"] == pytest.approx(3 / 5) and m["closed_balanced_accuracy"] == pytest.approx(0.5)
    m, _ = vqa_metrics(rows, [a for _, a in qs])
    assert m["closed_balanced_accuracy"] == 1.0


def _margin_rows():
    # the same question on four images; the truth depends on the image only
    return [{"id": str(i), "image": f"img{i}.png", "input": f"img{i}.png", "prompt": "[INST] <img><ImageHere></img> is there a red shape? [/INST]",
             "target": "yes" if i % 2 == 0 else "no", "type": "closed", "question": "is there a red shape?"}
            for i in range(4)] + [
            {"id": "open", "image": "img0.png", "input": "img0.png", "prompt": "[INST] <img><ImageHere></img> what colour? [/INST]",
             "target": "red", "type": "open", "question": "what colour?"}]


class _Looker(torch.nn.Module):
    """A stand-in composed model whose yes-minus-no logit margin is ``looks`` times the image's feature value."""

    def __init__(self, tok, looks: float) -> None:
        super().__init__()
        self.yes = tok(" yes", add_special_tokens=False)["input_ids"][0]
        self.no = tok(" no", add_special_tokens=False)["input_ids"][0]
        self.vocab = len(tok)
        self.looks = looks
        self.prior = torch.nn.Parameter(torch.tensor(-2.0))  # the question alone says "no"
        self.device = torch.device("cpu")

    def embed(self, input_ids, attention_mask, placeholder_positions, labels=None, *, features, **encoder_batch):
        return features.mean(dim=(1, 2)), attention_mask, None  # (B,): the image's value

    def llm(self, inputs_embeds, attention_mask, logits_to_keep):
        from types import SimpleNamespace

        logits = torch.zeros(inputs_embeds.size(0), 1, self.vocab)
        logits[:, -1, self.yes] = self.prior + self.looks * inputs_embeds
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("looks", [0.0, 3.0])
def test_closed_image_margin_is_zero_for_a_model_that_never_looks(tiny_llama, looks):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from modaltune.shared.skips import Skips
    from modaltune.vision.vqa import closed_image_margin

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    # image value +1 where the truth is yes, -1 where it is no
    feats = {f"img{i}.png": torch.full((3, 2), 1.0 if i % 2 == 0 else -1.0) for i in range(4)}
    ds = _dataset(_margin_rows(), tok, SimpleNamespace(get=feats.__getitem__, complete=True), max_length=128,
                   skipped=Skips())
    m = closed_image_margin(_Looker(tok, looks), tok, ds, batch_size=3)
    assert m["closed_image_margin_questions"] == 1.0  # one question text with both answers; the open one is left out
    assert m["closed_image_margin"] == pytest.approx(2 * looks)  # mean margin on yes-images minus on no-images


def test_closed_image_margin_runs_on_a_composed_model(tiny_llama, vqa_files):
    from modaltune.shared.skips import Skips
    from modaltune.vision import data as vdata
    from modaltune.vision.vqa import closed_image_margin, vqa_rows

    cfg = _cfg(tiny_llama, vqa_files, "projector.norm=rms")
    model, tok, _ = _build(cfg)
    items, _ = vdata.read_vqa_jsonl(str(vqa_files / "train.jsonl"), str(vqa_files))
    cache = _cache(model.encoder)
    cache.fill([it.image for it in items])
    ds = _dataset(vqa_rows(items), tok, cache, max_length=128, skipped=Skips())
    m = closed_image_margin(model, tok, ds, batch_size=4)
    # the margin it claims, by hand: each closed yes/no question alone (a batch of one, no padding) through the
    # model's plain forward; per question text, the mean yes-minus-no logit where the truth is yes minus where no
    yes = tok(" yes", add_special_tokens=False)["input_ids"][0]
    no = tok(" no", add_special_tokens=False)["input_ids"][0]
    collate = _collator(tok, prompt_only=True)
    model.eval()
    groups: dict[str, dict[str, list[float]]] = {}
    for i, row in enumerate(ds.rows):
        truth = row["target"].strip().lower()
        if row.get("type") != "closed" or truth not in {"yes", "no"}:
            continue
        with torch.no_grad():
            logits = model(**collate([ds[i]])).logits[0, -1]  # the prompt's last position
        margin = float(logits[yes] - logits[no])
        groups.setdefault(row["question"].strip().lower(), {"yes": [], "no": []})[truth].append(margin)
    gaps = [sum(g["yes"]) / len(g["yes"]) - sum(g["no"]) / len(g["no"]) for g in groups.values() if g["yes"] and g["no"]]
    assert m["closed_image_margin_questions"] == len(gaps) == 1.0
    assert m["closed_image_margin"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert abs(m["closed_image_margin"]) > 1e-4  # a random model's image does move its answer: the check has teeth


def test_word_grounding_pulls_word_tokens_onto_the_caption_words():
    from modaltune.shared.compose import WordAnchoredProjector, word_grounding_loss

    torch.manual_seed(0)
    ids = [10, 11, 12, 13, 10, 11, 12, 13]  # 4 distinct anchor words, cycled as the recipe does
    words = torch.randn(len(ids), 16)
    proj = WordAnchoredProjector(torch.nn.Linear(8, 16), words)
    proj.set_words(words, ids)
    proj.train()
    x = torch.randn(2, 5, 8)  # two images, 5 token groups each
    labels = torch.tensor([[-100, -100, 11, 13, 2], [-100, 12, 12, 2, -100]])  # caption words (2: eos, no anchor)
    rows = torch.tensor([True, True])
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        loss = word_grounding_loss(proj, proj(x), labels, rows)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5
    with torch.no_grad():
        out = proj(x)
        w = out.aux.weights  # (2, 5, K): what the projector returned, nothing kept on it
        bag = torch.zeros(2, 14).index_add_(1, torch.tensor(ids), w.mean(1))
    assert float(bag[0, [11, 13]].sum()) > 0.9 and float(bag[1, 12]) > 0.9  # only the caption's words are picked
    # rows not flagged (VQA answers) are not grounded; a projector without ids refuses
    assert word_grounding_loss(proj, out, labels, torch.tensor([False, False])) is None
    assert not any(torch.is_tensor(v) for k, v in vars(proj).items() if not k.startswith("_"))  # no per-call state
    bare = WordAnchoredProjector(torch.nn.Linear(8, 16), words).train()
    with pytest.raises(Exception, match="anchor token ids"):
        word_grounding_loss(bare, bare(x), labels, rows)


def test_caption_rows_are_flagged_for_grounding(tiny_gemma):
    from transformers import AutoTokenizer

    from modaltune.shared.skips import Skips

    tok = AutoTokenizer.from_pretrained(str(tiny_gemma))
    rows = [{"id": "c", "image": "a.png", "input": "a.png", "prompt": "[INST] <img><ImageHere></img> describe [/INST]",
             "target": "a red circle", "type": "caption"},
            {"id": "q", "image": "a.png", "input": "a.png", "prompt": "[INST] <img><ImageHere></img> red? [/INST]", "target": "yes",
             "type": "closed"}]
    feats = {"a.png": torch.zeros(3, 2)}
    from types import SimpleNamespace

    ds = _dataset(rows, tok, SimpleNamespace(get=feats.__getitem__, complete=True), max_length=64, skipped=Skips())
    batch = _collator(tok)([ds[0], ds[1]])
    assert batch["ground_words"].tolist() == [True, False]
    assert "ground_words" not in _collator(tok)([ds[1]])  # VQA-only batches are unchanged
    assert "ground_words" not in _collator(tok, left=True, prompt_only=True)([ds[0]])


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_grounding_weight_comes_from_the_config(tiny_gemma, vqa_files, weight):
    cfg = _cfg(tiny_gemma, vqa_files, f"projector.word_grounding={weight}")
    model, _, _ = _build(cfg)
    assert model.word_grounding == weight and model.config.projector["word_grounding"] == weight


def test_composed_model_gives_sequence_log_probs_for_preference_training(tiny_llama, vqa_files):
    """The shared DPO pieces work on a model composed from parts: per-row log-probs of the answers (summing to the
    mean loss the trainer uses), and the reference with the LLM's adapters off."""
    from collections import Counter

    from modaltune.shared.preference import reference_of, sequence_logps
    from modaltune.vision.data import read_vqa_jsonl
    from modaltune.vision.vqa import vqa_rows

    model, tok, _ = _build(_cfg(tiny_llama, vqa_files, "llm.dropout=0.0"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    items, _ = read_vqa_jsonl(str(vqa_files / "train.jsonl"))
    ds = _dataset(vqa_rows(items[:4]), tok, None, max_length=128, skipped=Counter())
    batch = _collator(tok, model.encoder)([ds[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        rows = sequence_logps(model, batch)
        mean = float(model(**batch)["loss"])
        with reference_of(model):
            ref = sequence_logps(model, batch)
    assert rows.shape == (4,) and (rows < 0).all()
    counted = int((batch["labels"][:, 1:] != -100).sum())
    assert -float(rows.sum()) / counted == pytest.approx(mean, rel=1e-5)
    assert not torch.allclose(rows, ref)


def test_vqa_pairs_flip_closed_answers_and_keep_open_ones_of_their_kind():
    from modaltune.shared.skips import Skips
    from modaltune.vision.data import VQAItem
    from modaltune.vision.vqa import vqa_pair_rows

    items = [VQAItem("a", None, "What color is the shape?", "red", "open"),
             VQAItem("b", None, "What color is it?", "blue", "open"),
             VQAItem("c", None, "What shape is this?", "circle", "open"),
             VQAItem("d", None, "Is there a red shape?", "yes", "closed"),
             VQAItem("e", None, "Is there no blue shape?", "no", "closed")]
    skipped = Skips()
    good, bad = vqa_pair_rows(items, 0, skipped)
    pairs = {g["id"]: (g["target"], b["target"]) for g, b in zip(good, bad)}
    assert pairs == {"a": ("red", "blue"), "b": ("blue", "red"), "d": ("yes", "no"), "e": ("no", "yes")}
    assert dict(skipped) == {"no wrong answer of the same kind for a preference pair": 1}  # the only shape answer
    assert all(g["prompt"] == b["prompt"] and g["image"] == b["image"] for g, b in zip(good, bad))


def test_a_preference_stage_trains_a_composed_model_against_its_start(tiny_llama, vqa_files, tmp_path):
    from modaltune.shared.cli import main

    out = tmp_path / "run"
    assert main(_tiny_run(out, tiny_llama, vqa_files, "train.logging_steps=1",
                          "stages=[{name: vqa, data: vqa, max_steps: 2}, {name: dpo, data: vqa_pairs, max_steps: 6, "
                          "lr: 0.01}]")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    assert [s["stage"] for s in report["training"]["stages"]] == ["vqa", "dpo"]
    assert report["data"]["vqa_pairs_train"]["kept"] == 12
    curve = [r for r in report["training"]["curve"] if r.get("stage") == "dpo" and "rewards/margin" in r]
    # the reference is the model as the stage starts: no margin at the first step, a positive one by the end
    assert curve[0]["step"] == 1 and curve[0]["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert curve[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert curve[-1]["rewards/margin"] > 0.01 and curve[-1]["loss"] < 0.69
    assert {"after_vqa", "after"} <= set(report["metrics"])


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_our_preference_trainer_takes_the_same_step_as_trls(sft_weight, tiny_llama, sft_data, tmp_path):
    """The one preference implementation (used for composed models) equals trl's DPOTrainer on text pairs: the same
    losses and the same weights after three SGD steps (Adam would magnify last-bit differences of near-zero
    gradients: 1.4e-5 after three steps at lr 1e-2, with the losses within 1e-5)."""
    import torch

    from modaltune.shared.config import from_dict
    from modaltune.shared.lm import ModelConfig, build_text_model
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.preference import PairCollator, PairedDataset, PreferenceConfig, preference_stage_trainer
    from modaltune.shared.skips import Skips
    from modaltune.text.data import PadCollator, PromptFormatter
    from modaltune.text.preference import PairDataConfig, TokenizedPairs, dpo_stage_trainer, load_pairs

    pref = PreferenceConfig(beta=0.2, sft_weight=sft_weight)
    results = []
    for ours in (False, True):
        torch.manual_seed(0)
        model, tok, _ = build_text_model(
            from_dict(ModelConfig, {"name": str(tiny_llama)}),
            from_dict(ComponentConfig, {"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}),
            compute_dtype=torch.float32, log_fn=lambda *_: None)
        model.record_trained()
        formatter = PromptFormatter(tok)
        pairs, _ = load_pairs(PairDataConfig(source="builtin:clinical_pref", max_train_pairs=8))
        tokenized = TokenizedPairs(pairs["train"], formatter, 256, Skips())
        args = dict(output_dir=str(tmp_path / str(ours)), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    learning_rate=0.5, optim="sgd", max_steps=3, lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0, remove_unused_columns=False,
                    max_grad_norm=0.0, weight_decay=0.0, disable_tqdm=True)
        common = dict(model=model, arguments=args, eval_dataset=None, component_lrs={}, callbacks=[])
        if ours:
            data = PairedDataset([p["chosen"] for p in tokenized.items], [p["rejected"] for p in tokenized.items])
            trainer = preference_stage_trainer(pref)(train_dataset=data, data_collator=PairCollator(
                PadCollator(tok.pad_token_id)), **common)
        else:
            trainer = dpo_stage_trainer(tok, pref, max_length=256)(train_dataset=tokenized.for_trl(formatter),
                                                                    **common)
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        results.append((losses, {k: v.clone() for k, v in model.trained_state_dict().items()}))
    (trl_losses, trl_weights), (our_losses, our_weights) = results
    assert our_losses == pytest.approx(trl_losses, abs=1e-5)
    worst = max(float((trl_weights[k] - our_weights[k]).abs().max()) for k in trl_weights)
    assert worst < 1e-5, worst


def test_closed_rationale_is_said_before_the_answer_and_scored_apart():
    from modaltune.shared.skips import Skips
    from modaltune.vision.data import VQAItem
    from modaltune.vision.vqa import split_answer, vqa_metrics, vqa_pair_rows, vqa_rows

    items = [VQAItem("a", "x.png", "is there a red shape?", "no", "closed", "A blue circle."),
             VQAItem("b", "y.png", "is there not a circle?", "no", "closed", "A red circle."),
             VQAItem("c", "z.png", "is there a circle?", "yes", "closed"),  # no caption: the plain answer
             VQAItem("d", "x.png", "what color is the shape?", "blue", "open")]
    rows = vqa_rows(items)
    assert [r["target"] for r in rows] == ["A blue circle. Answer: no", "A red circle. Answer: no", "yes", "blue"]
    assert [r["answer"] for r in rows] == ["no", "no", "yes", "blue"]
    assert split_answer("A red circle. answer: Yes") == ("A red circle.", "Yes") and split_answer("no") == ("", "no")
    said = ["A blue circle. Answer: no",  # saw right, compared right
            "A red square. Answer: no",  # saw wrong, answered right
            "yes", "blue"]
    m, per_item = vqa_metrics(rows, said)
    assert m["closed_accuracy"] == 1.0 and m["accuracy"] == 1.0
    assert m["closed_rationale_accuracy"] == 0.5  # only the two rows with a rationale count
    assert per_item[1]["prediction"] == said[1] and per_item[1]["answer"] == "no"
    m, _ = vqa_metrics(rows, ["A blue circle. Answer: yes", "A red circle. Answer: no", "no", "red"])
    assert m["closed_accuracy"] == pytest.approx(1 / 3) and m["closed_rationale_accuracy"] == 1.0
    good, bad = vqa_pair_rows(items, 0, Skips())  # the rejected answer keeps the rationale, flips the answer
    assert bad[0]["target"] == "A blue circle. Answer: yes" and good[0]["target"] == rows[0]["target"]


def test_closed_rationale_comes_from_captions_of_the_same_images(tiny_llama, vqa_files, tmp_path):
    captions = tmp_path / "captions.txt"  # ROCO-style: id -> images/<id>.png; img5 has no caption
    captions.write_text("".join(f"img{i}\tA {['red', 'blue', 'green'][i % 3]} square.\n" for i in range(5)))
    extra = [f"data.captions={captions}", f"data.caption_images={vqa_files / 'images'}"]
    cfg = _cfg(tiny_llama, vqa_files, *extra, "data.closed_rationale=caption")
    sets, counts = load_vqa_sets(cfg.data)
    said = {it.image.rsplit("/", 1)[-1]: it.rationale for it in sets["vqa_train"] if it.answer_type == "closed"}
    assert said == {"img0.png": "A red square.", "img1.png": "A blue square.", "img2.png": "A green square.",
                    "img3.png": "A red square.", "img4.png": "A blue square.", "img5.png": None}
    assert all(it.rationale is None for it in sets["vqa_train"] if it.answer_type == "open")
    assert counts["vqa_train"]["closed_rationale"] == {"with": 5, "without (no caption of the image)": 1}
    plain, plain_counts = load_vqa_sets(_cfg(tiny_llama, vqa_files, *extra).data)
    assert all(it.rationale is None for it in plain["vqa_train"]) and "closed_rationale" not in plain_counts["vqa_train"]
    with pytest.raises(ConfigError, match="closed_rationale"):
        _cfg(tiny_llama, vqa_files, "data.closed_rationale=always")


def test_recipe_trains_and_scores_closed_rationales(tiny_llama, vqa_files, tmp_path):
    from modaltune.shared.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"img{i}\tA {['red', 'blue', 'green'][i % 3]} square.\n" for i in range(6)))
    out = tmp_path / "run"
    assert main(_tiny_run(out, tiny_llama, vqa_files, f"data.captions={captions}",
                          f"data.caption_images={vqa_files / 'images'}", "data.closed_rationale=caption",
                          "stages[0].max_steps=1", "stages[1].max_steps=2", "eval.max_new_tokens=3")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    assert "test/closed_rationale_accuracy" in report["metrics"]["after"]
    assert "test/closed_image_margin" not in report["metrics"]["after"]  # the first answer token is the rationale's
    assert report["data"]["vqa_train"]["closed_rationale"]["with"] == 6
