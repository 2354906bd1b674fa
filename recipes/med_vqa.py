"""med-vqa: a vision-language model composed from parts, trained in two stages (captions, then VQA).

Build the image encoder (frozen), the projector (trainable) and the LoRA LLM; build caption and VQA data; cache
the frozen encoder's features; evaluate with the untrained projector; train the stages; evaluate after each; report.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from modaltune.shared import checkpoint as ckpt
from modaltune.shared.compose import ComposedLM, anchor_embeddings, build_projector, embedding_rms
from modaltune.shared.config import ConfigError, doc, to_dict
from modaltune.shared.errors import DataError, ModaltuneError
from modaltune.shared.loss import unwrap_peft
from modaltune.shared.peft import QUANTISED, ComponentConfig, ComponentSpec, apply_peft
from modaltune.shared.recipe import Recipe, RunContext, register_recipe
from modaltune.shared.skips import Skips, add_to_summary
from modaltune.shared.training import StageConfig, StagePlan, TrainConfig, resolve_precision, run_stages
from modaltune.text.lm import ModelConfig, load_causal_lm
from modaltune.vision import data as vdata
from modaltune.vision.encoders import EncoderConfig, build_encoder
from modaltune.vision.vqa import (FeatureCache, VLCollator, VLDataset, caption_metrics, caption_rows, closed_class,
                                  closed_confusion, closed_image_margin, generate_answers, vqa_metrics, vqa_rows)


@dataclasses.dataclass
class ProjectorConfig:
    """The trainable bridge from encoder tokens to LLM embeddings."""

    kind: str = doc("linear", "linear | mlp2x_gelu (or a plugin's name)")
    group: int = doc(4, "concatenate this many consecutive encoder tokens into one")
    group_mode: str = doc("pad", "when the token count is not divisible by group: pad | trim")
    lr: float | None = doc(None, "learning rate of the projector (null: train.lr)")
    norm: str = doc("both", "both: every token group gives a word token and a feature token | words: each "
                            "projected token is a soft mixture of the LLM's embeddings of the training text's most "
                            "frequent tokens, so the LM reads it as words | rms: RMS-normalised to the LLM's "
                            "embedding scale | none: the raw projector output")
    anchor_words: int = doc(256, "norm=words/both: how many of the training text's most frequent tokens are anchors")
    word_grounding: float = doc(0.0, "norm=words/both: weight of a loss, on caption rows, that makes each image's "
                                     "word tokens the words of its caption (0: off)")
    words: str = doc("soft", "norm=words/both: soft (each word token a softmax mixture of anchors) | hard (exactly "
                             "one anchor word each, trained straight-through)")

    def validate(self, where: str) -> None:
        if self.norm not in {"none", "rms", "words", "both"}:
            raise ConfigError(f"{where}.norm must be none, rms, words or both, got {self.norm!r}")
        if self.word_grounding < 0:
            raise ConfigError(f"{where}.word_grounding must be 0 (off) or positive")
        if self.words not in {"soft", "hard"}:
            raise ConfigError(f"{where}.words must be soft or hard, got {self.words!r}")
        if self.anchor_words < 2:
            raise ConfigError(f"{where}.anchor_words must be at least 2")
        if self.group < 1:
            raise ConfigError(f"{where}.group must be at least 1")
        if self.group_mode not in {"pad", "trim"}:
            raise ConfigError(f"{where}.group_mode must be pad or trim")


@dataclasses.dataclass
class VQADataConfig:
    """Caption and VQA data."""

    layout: str = doc("easy-vqa", "easy-vqa | vqa-rad | slake | pathvqa | jsonl")
    train: str | None = doc(None, "training questions file (JSON/JSONL in the layout's format)")
    test: str | None = doc(None, "test questions file")
    image_dir: str | None = doc(None, "folder the question files name images in")
    captions: str | None = doc(None, "stage-1 captions: ROCO-style caption file (null: derive from the VQA data)")
    caption_images: str | None = doc(None, "folder of the caption images")
    max_train_images: int | None = doc(None, "draw questions and captions from at most this many training images")
    max_test_images: int | None = doc(None, "draw test questions and captions from at most this many test images")
    max_train_questions: int | None = doc(None, "use at most this many training questions (seeded sample)")
    max_test_questions: int | None = doc(None, "evaluate on at most this many test questions (seeded sample)")
    max_train_captions: int | None = doc(None, "use at most this many training captions")
    max_test_captions: int | None = doc(None, "evaluate at most this many captions")
    seed: int = doc(0, "seed of the samples")
    max_length: int = doc(128, "examples longer than this many tokens (visual tokens excluded) are dropped")
    root_only: bool = doc(False, "skip images whose paths lead outside their image folder (absolute, .., links); "
                                 "turn on for question files from others")
    balance_closed: str = doc(
        "none", "balance the closed training questions (seeded downsampling of the larger class): none | answer "
               "(as many yes as no) | presence (as many 'the asked thing is there' as 'it is not', reading "
               "negations: 'is there not a ...? no' means present)")

    def validate(self, where: str) -> None:
        if self.layout not in {"easy-vqa", "vqa-rad", "slake", "pathvqa", "jsonl"}:
            raise ConfigError(f"{where}.layout must be easy-vqa, vqa-rad, slake, pathvqa or jsonl")
        if self.balance_closed not in {"none", "answer", "presence"}:
            raise ConfigError(f"{where}.balance_closed must be none, answer or presence, got {self.balance_closed!r}")


@dataclasses.dataclass
class VQAEvalConfig:
    """Generation for evaluation."""

    max_new_tokens: int = doc(8, "longest answer, in tokens")
    caption_max_new_tokens: int = doc(16, "longest caption, in tokens")
    num_beams: int = doc(1, "1: greedy")
    batch_size: int = doc(32, "prompts per generation batch")


def _default_stages() -> list[StageConfig]:
    return [StageConfig(name="caption", data="caption"), StageConfig(name="vqa", data="vqa")]


@dataclasses.dataclass
class MedVQAConfig:
    """Schema of ``recipes/configs/med-vqa.yaml``."""

    encoder: EncoderConfig = doc(EncoderConfig, "the image encoder")
    encoder_tuning: ComponentConfig = doc(help="how the encoder is tuned (frozen: features are cached)",
                                          factory=lambda: ComponentConfig(method="frozen", targets=["conv_pw"]))
    projector: ProjectorConfig = doc(ProjectorConfig, "projector and token grouping")
    model: ModelConfig = doc(ModelConfig, "the causal LLM")
    llm: ComponentConfig = doc(help="how the LLM is tuned", factory=lambda: ComponentConfig(method="lora"))
    data: VQADataConfig = doc(VQADataConfig, "caption and VQA data")
    stages: list[StageConfig] = doc(help="training stages in order", factory=_default_stages)
    train: TrainConfig = doc(TrainConfig, "optimisation (shared by the stages)")
    eval: VQAEvalConfig = doc(VQAEvalConfig, "generation for evaluation")
    quick: dict[str, Any] = doc({}, "dotted-key overrides applied by --quick")

    def validate(self, where: str) -> None:
        for key, comp, cc in (("encoder_tuning", "encoder", self.encoder_tuning), ("llm", "llm", self.llm)):
            if cc.trains and not any(s.components is None or comp in s.components for s in self.stages):
                raise ConfigError(
                    f"{key}.method={cc.method}, but no stage trains the {comp}: add {comp!r} to a stage's "
                    f"components (e.g. stages[{len(self.stages) - 1}].components=[{comp},projector,llm])")


class MedVQA(Recipe):
    name = "med-vqa"
    description = "vision-language model from parts (frozen encoder + projector + LoRA LLM), captions then VQA"
    config_cls = MedVQAConfig
    config_file = "med-vqa.yaml"

    # -- building blocks -----------------------------------------------------------------------------------
    def build(self, cfg: MedVQAConfig, log=print, *, llm: ComponentConfig | None = None):
        precision = resolve_precision(cfg.train.precision)
        self.precision = precision
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        llm = llm or cfg.llm
        if llm.method in {"prompt_tuning", "prefix_tuning"}:
            raise ConfigError("llm.method: prompt/prefix tuning cannot take spliced image tokens; use lora, dora, ...")
        encoder = build_encoder(cfg.encoder, log=log)
        encoder = apply_peft(encoder, [ComponentSpec("encoder", "", cfg.encoder_tuning)], causal_lm=False)
        lm, tok, source = load_causal_lm(cfg.model, method=llm.method, compute_dtype=compute,
                                         quantize_head=llm.quantize_head, log_fn=log)
        lm = apply_peft(lm, [ComponentSpec("llm", "", llm)]) if llm.method != "frozen" else _frozen(lm)
        hidden = unwrap_peft(lm).get_input_embeddings().embedding_dim
        out_dim = encoder.out_dim if hasattr(encoder, "out_dim") else unwrap_peft(encoder).out_dim
        scale = embedding_rms(lm) if cfg.projector.norm in {"rms", "both"} else None
        # norm=words/both: placeholders until set_anchor_words (a run) or a checkpoint (evaluate, merge) fills them
        words = torch.zeros(cfg.projector.anchor_words, hidden) if cfg.projector.norm in {"words", "both"} else None
        projector = build_projector(cfg.projector.kind, in_dim=out_dim, out_dim=hidden, group=cfg.projector.group,
                                    norm=cfg.projector.norm, scale=scale, words=words,
                                    hard_words=cfg.projector.words == "hard")
        model = ComposedLM(encoder, projector, lm, group=cfg.projector.group, group_mode=cfg.projector.group_mode,
                           label_logits_only=cfg.train.label_logits_only,
                           encoder_train_mode=cfg.encoder_tuning.method == "full",
                           word_grounding=cfg.projector.word_grounding if cfg.projector.norm in {"words", "both"} else 0.0)
        full = ["projector"] + [n for n, c in (("encoder", cfg.encoder_tuning), ("llm", llm)) if c.method == "full"]
        model.record_trained(full_components=full)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, tok, source, precision

    def set_anchor_words(self, cfg: MedVQAConfig, model, tok, raw: dict[str, list], log=print) -> list[int]:
        """norm=words/both: anchor the projector on the ``anchor_words`` most frequent tokens of the training text
        (captions, questions, answers; the prompt template excluded). Returns the anchor token ids."""
        counts: Counter = Counter()
        texts = [it.caption for it in raw["caption_train"]]
        texts += [t for it in raw["vqa_train"] for t in (it.question, it.answer)]
        for text in texts:
            counts.update(tok(" " + text.strip(), add_special_tokens=False)["input_ids"])
        special = set(tok.all_special_ids)
        ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in special]
        if not ranked:
            raise DataError(f"projector.norm={cfg.projector.norm} needs training text (captions or questions) "
                            "to take anchor words from; or set projector.norm=rms")
        k = cfg.projector.anchor_words
        ids = [ranked[i % len(ranked)] for i in range(k)]  # fewer distinct tokens than k: cycled, counts within 1
        model.projector.set_words(anchor_embeddings(model.llm, ids), ids)
        log(f"projector anchored on {min(k, len(ranked))} distinct words of the training text, e.g. "
            + " ".join(repr(tok.decode([t]).strip()) for t in ranked[:12]))
        return ids

    def feature_depth(self, model) -> int | None:
        """Where the feature cache takes the encoder's states: its output when frozen, the input of the lowest
        trained block when only top blocks train (``encoder_tuning.layers``); None: no cache."""
        return unwrap_peft(model.encoder).cache_depth()

    def load_data(self, cfg: MedVQAConfig, log) -> tuple[dict[str, list], dict]:
        d = cfg.data
        skipped = {s: Skips() for s in ("vqa_train", "vqa_test", "caption_train", "caption_test")}
        if d.layout == "easy-vqa":
            train, s1 = vdata.read_easy_vqa("train")
            test, s2 = vdata.read_easy_vqa("test")
        else:
            if not d.train or not d.test:
                raise DataError(f"data.layout={d.layout}: set data.train and data.test (question files)")
            reader = {"vqa-rad": vdata.read_vqa_rad, "slake": vdata.read_slake, "pathvqa": vdata.read_pathvqa,
                      "jsonl": vdata.read_vqa_jsonl}[d.layout]
            image_dir = d.image_dir or str(Path(d.train).parent)
            train, s1 = reader(d.train, image_dir)
            test, s2 = reader(d.test, image_dir)
            if d.root_only:
                train = vdata.keep_within(train, image_dir, s1)
                test = vdata.keep_within(test, image_dir, s2)
        skipped["vqa_train"].update(s1)
        skipped["vqa_test"].update(s2)
        rng = random.Random(d.seed)
        train = _sample_images(train, d.max_train_images, rng, skipped["vqa_train"], "max_train_images")
        test = _sample_images(test, d.max_test_images, rng, skipped["vqa_test"], "max_test_images")
        if d.captions:
            caption_images = d.caption_images or str(Path(d.captions).parent)
            caps, s3 = vdata.read_roco_captions(caption_images, d.captions)
            if d.root_only:
                caps = vdata.keep_within(caps, caption_images, s3)
            skipped["caption_train"].update(s3)
            rng.shuffle(caps)
            n_test = min(len(caps) // 10, d.max_test_captions or len(caps))
            cap_test, cap_train = caps[:n_test], caps[n_test:]
        else:  # derived from the VQA data (every image's facts), so stage 1 needs no extra files
            cap_train, s4 = vdata.easy_vqa_captions(train) if d.layout == "easy-vqa" else ([], Skips())
            cap_test, s5 = vdata.easy_vqa_captions(test) if d.layout == "easy-vqa" else ([], Skips())
            skipped["caption_train"].update(s4)
            skipped["caption_test"].update(s5)
        # questions are sampled after captions were derived, so each image keeps all its facts
        train = _balance_closed(train, d.balance_closed, rng, skipped["vqa_train"])
        train = _sample(train, d.max_train_questions, rng, skipped["vqa_train"], "max_train_questions")
        test = _sample(test, d.max_test_questions, rng, skipped["vqa_test"], "max_test_questions")
        cap_train = _sample(cap_train, d.max_train_captions, rng, skipped["caption_train"], "max_train_captions")
        cap_test = _sample(cap_test, d.max_test_captions, rng, skipped["caption_test"], "max_test_captions")
        sets = {"vqa_train": train, "vqa_test": test, "caption_train": cap_train, "caption_test": cap_test}
        for name in sets:
            sets[name] = vdata.validate_images(sets[name], skipped[name])
        if not sets["vqa_train"]:
            raise DataError(f"no usable training questions: {dict(skipped['vqa_train'])}")
        counts = {n: skipped[n].summary(len(v)) for n, v in sets.items()}
        return sets, counts

    def datasets(self, cfg, sets, tok, cache, counts) -> dict[str, VLDataset]:
        seed = cfg.data.seed
        rows = {"vqa_train": vqa_rows(sets["vqa_train"]), "vqa_test": vqa_rows(sets["vqa_test"]),
                "caption_train": caption_rows(sets["caption_train"], seed),
                "caption_test": caption_rows(sets["caption_test"], seed + 1)}
        out = {}
        for name, r in rows.items():
            skipped = Skips()
            out[name] = VLDataset(r, tok, cache, max_length=cfg.data.max_length, skipped=skipped)
            add_to_summary(counts[name], skipped, len(out[name]))
        return out

    def measure(self, cfg, model, tok, sets, encoder, label: str):
        metrics, items = {}, []
        if len(sets["vqa_test"]):
            answers = generate_answers(model, tok, sets["vqa_test"], batch_size=cfg.eval.batch_size,
                                       max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                                       encoder=encoder, desc=f"VQA ({label})", precision=self.precision)
            m, items = vqa_metrics(sets["vqa_test"].rows, answers)
            m.update(closed_image_margin(model, tok, sets["vqa_test"], batch_size=cfg.eval.batch_size, encoder=encoder,
                                         precision=self.precision))
            metrics.update({f"test/{k}": v for k, v in m.items()})
        if len(sets["caption_test"]):
            caps = generate_answers(model, tok, sets["caption_test"], batch_size=cfg.eval.batch_size,
                                    max_new_tokens=cfg.eval.caption_max_new_tokens, num_beams=cfg.eval.num_beams,
                                    encoder=encoder, desc=f"captions ({label})", precision=self.precision)
            metrics.update({f"caption/{k}": v for k, v in caption_metrics(sets["caption_test"].rows, caps).items()})
        return metrics, items

    # -- commands -----------------------------------------------------------------------------------------
    def run(self, cfg: MedVQAConfig, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        t0 = time.time()
        model, tok, source, precision = self.build(cfg, log)
        report["model"] = {**source, "encoder": cfg.encoder.kind, "projector": cfg.projector.kind,
                           "group": cfg.projector.group, "precision": precision, "llm_method": cfg.llm.method,
                           "feature_cache": self.feature_depth(model) is not None,
                           "feature_cache_depth": self.feature_depth(model)}
        report["parameters"] = model.parameter_report()
        raw, report["data"] = self.load_data(cfg, log)
        if cfg.projector.norm in {"words", "both"}:
            anchors = self.set_anchor_words(cfg, model, tok, raw, log)
            report["model"]["anchor_words"] = [tok.decode([t]) for t in dict.fromkeys(anchors)]
        cache = None
        t1 = time.time()
        if self.feature_depth(model) is not None:
            cache = FeatureCache(model.encoder, batch_size=64, depth=self.feature_depth(model),
                                 autocast_dtype=torch.bfloat16 if precision == "bf16" else None)
            cache.fill([it.image for name in raw for it in raw[name]], desc="encoding images (once)")
        report["timing"] = {"setup_seconds": round(t1 - t0, 2), "feature_cache_seconds": round(time.time() - t1, 2)}
        sets = self.datasets(cfg, raw, tok, cache, report["data"])
        log("data: " + ", ".join(f"{k} {v['kept']} kept / {v['skipped']} skipped" for k, v in report["data"].items()))
        encoder = model.encoder if cache is None else None

        t2 = time.time()
        columns: dict[str, dict] = {}
        columns["before"], items_before = self.measure(cfg, model, tok, sets, encoder, "untrained projector")
        log("before: " + _line(columns["before"]))
        report["timing"]["eval_before_seconds"] = round(time.time() - t2, 2)
        stage_items = {"before": items_before}
        collator = VLCollator(tok.pad_token_id, encoder)
        lrs = {n: lr for n, lr in (("projector", cfg.projector.lr), ("llm", cfg.llm.lr),
                                    ("encoder", cfg.encoder_tuning.lr)) if lr}
        plans = []
        for i, stage in enumerate(cfg.stages):
            key = {"caption": "caption_train", "vqa": "vqa_train"}.get(stage.data)
            if key is None:
                raise ConfigError(f"stages[{i}].data must be caption or vqa, got {stage.data!r}")
            if not len(sets[key]):
                log(f"stage {stage.name}: no {stage.data} data, skipped")
                continue
            plans.append(StagePlan(stage.name, sets[key], None, stage.components, stage.max_steps, stage.lr))
        if not plans:
            raise ModaltuneError("no stage has data: check the stages list and the data")

        def after(stage: StagePlan) -> None:
            label = "after" if stage is plans[-1] else f"after_{stage.name}"
            t = time.time()
            columns[label], stage_items[label] = self.measure(cfg, model, tok, sets, encoder, label)
            report["timing"][f"eval_{label}_seconds"] = round(time.time() - t, 2)
            log(f"{label}: " + _line(columns[label]))

        t = time.time()
        result = run_stages(model, plans, cfg.train, run_dir=ctx.run_dir, collator=collator, component_lrs=lrs,
                            checkpoint_meta={"recipe": self.name, "config": to_dict(cfg), "model_source": source},
                            tokenizer=tok, after_stage=after, log=ctx.log)
        report["timing"]["train_and_stage_eval_seconds"] = round(time.time() - t, 2)
        report["checkpoint"] = str(result.checkpoint)
        summaries, curve = result.stages, result.rows
        report["training"] = {"stages": summaries, "curve": curve}
        report["metrics"] = columns
        report["items"] = _merge_items(stage_items)
        report["plots"] = _plots(ctx.run_dir, stage_items)
        report["notes"] = ["before = untrained projector and fresh LoRA; after_<stage> = after that stage.",
                           "accuracy: exact match after answer normalisation (lower case, no punctuation/articles)."]

    def evaluate(self, cfg: MedVQAConfig, checkpoint: Path, ctx: RunContext) -> None:
        report, log = ctx.report, ctx.log
        model, tok, source, precision = self.build(cfg, log)
        raw, report["data"] = self.load_data(cfg, log)
        depth = self.feature_depth(model)
        cache = FeatureCache(model.encoder, depth=depth) if depth is not None else None
        if cache:
            cache.fill([it.image for n in ("vqa_test", "caption_test") for it in raw[n]])
        sets = self.datasets(cfg, raw, tok, cache, report["data"])
        encoder = model.encoder if cache is None else None
        before, items_b = self.measure(cfg, model, tok, sets, encoder, "untrained")
        ckpt.load_trained(model, checkpoint)
        after, items_a = self.measure(cfg, model, tok, sets, encoder, "checkpoint")
        report["metrics"] = {"before": before, "after": after}
        report["items"] = _merge_items({"before": items_b, "after": items_a})
        report["plots"] = _plots(ctx.run_dir, {"after": items_a})
        log("checkpoint: " + _line(after))

    def merge(self, cfg: MedVQAConfig, checkpoint: Path, out: Path, log) -> list[tuple[str, Path]]:
        llm = dataclasses.replace(cfg.llm, method="lora") if cfg.llm.method in QUANTISED else cfg.llm
        fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
        model, tok, source, _ = self.build(fp32, log, llm=llm)
        ckpt.load_trained(model, checkpoint)
        lm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
        out.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(out / "llm"))
        tok.save_pretrained(str(out / "llm"))
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(out / "projector.safetensors"))
        (out / "composition.json").write_text(
            json.dumps({"encoder": to_dict(cfg.encoder), "projector": to_dict(cfg.projector),
                                      "template": vdata.VQA_TEMPLATE}, indent=2) + "\n", encoding="utf-8")
        log(f"merged LLM into {out / 'llm'}; projector in {out / 'projector.safetensors'}")
        return [(source["path"], out / "llm")]


def _frozen(lm):
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


def _sample(items: list, cap: int | None, rng: random.Random, skipped: Skips, name: str) -> list:
    if cap is None or len(items) <= cap:
        return list(items)
    skipped[f"over {name}={cap}"] += len(items) - cap
    return rng.sample(list(items), cap)


def _balance_closed(items: list, mode: str, rng: random.Random, skipped: Skips) -> list:
    """Downsample the larger classes of closed questions (see :func:`closed_class`) to the smallest one's size.

    Closed questions are often lopsided (most "is there a red shape?" questions are about shapes that are not
    red), and a model can then score well by never looking: balancing takes that shortcut away.
    """
    if mode == "none":
        return list(items)
    by_class: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        label = closed_class(item.question, item.answer, item.answer_type, mode)
        if label is not None:
            by_class.setdefault(label, []).append(i)
    if len(by_class) < 2:
        return list(items)
    size = min(len(v) for v in by_class.values())
    drop = set()
    for label, idx in sorted(by_class.items()):
        drop.update(rng.sample(idx, len(idx) - size))
    if drop:
        skipped[f"balance_closed={mode}"] += len(drop)
    return [it for i, it in enumerate(items) if i not in drop]


def _sample_images(items: list, cap: int | None, rng: random.Random, skipped: Skips, name: str) -> list:
    """Keep the items of at most ``cap`` distinct images (seeded); fewer images means fewer encoder passes."""
    images = sorted({it.image for it in items})
    if cap is None or len(images) <= cap:
        return list(items)
    keep = set(rng.sample(images, cap))
    kept = [it for it in items if it.image in keep]
    skipped[f"over {name}={cap}"] += len(items) - len(kept)
    return kept


def _merge_items(stage_items: dict[str, list[dict]]) -> list[dict]:
    """One row per test question with every column's answer; wrong-after first."""
    last = list(stage_items)[-1]
    cols = {name: {r["id"]: r for r in rows} for name, rows in stage_items.items()}
    rows = []
    for r in stage_items[last]:
        row = {"id": r["id"], "image": r["image"], "type": r["type"], "question": r["question"],
               "reference": r["reference"]}
        for name in stage_items:
            row[name] = cols[name].get(r["id"], {}).get("prediction")
        row["correct"] = r["correct"]
        rows.append(row)
    rows.sort(key=lambda x: x["correct"])
    return rows


def _plots(run_dir: Path, stage_items: dict[str, list[dict]]) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = stage_items[list(stage_items)[-1]]
    table = closed_confusion(items)
    if not table:
        return []
    refs = list(table)
    preds = list(next(iter(table.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(preds), 1.0 + 0.7 * len(refs)))
    data = [[table[r][p] for p in preds] for r in refs]
    ax.imshow(data, cmap="Blues")
    for i, r in enumerate(refs):
        for j, p in enumerate(preds):
            ax.text(j, i, str(table[r][p]), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(preds)), preds)
    ax.set_yticks(range(len(refs)), refs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title("Closed questions")
    path = run_dir / "closed_confusion.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [{"title": "Closed-question confusion (final model)", "path": str(path)}]


def _line(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()))


register_recipe(MedVQA())
