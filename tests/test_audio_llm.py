"""audio-llm: clips of different lengths through the composition core, speech tasks, the shuffled-audio guard and
the recipe end to end (run, eval, merge and reload) on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modaltune.audio.llm import (AUDIO_PLACEHOLDER, AudioTasksConfig, cascade_rows, order_answer, order_scores,
                                 shuffled, task_rows)
from modaltune.shared.features import FeatureCache

QUIET = {"log": lambda *_: None}


def _composed(tiny_whisper, llm_folder, **projector):
    from modaltune.shared.compose import EncoderConfig, ProjectorConfig, build_composed_lm, build_encoder
    from modaltune.shared.lm import ModelConfig
    from modaltune.shared.peft import ComponentConfig

    torch.manual_seed(0)
    encoder = build_encoder(EncoderConfig(kind="whisper", name=str(tiny_whisper)), **QUIET)
    return build_composed_lm(encoder=encoder, encoder_tuning=ComponentConfig(method="frozen"),
                             model=ModelConfig(name=str(llm_folder)), llm=ComponentConfig(method="lora", r=4, alpha=8),
                             projector=ProjectorConfig(**{"group": 8, "norm": "rms", **projector}), **QUIET)


def _clips(seconds=(0.5, 1.3, 2.2)):
    rng = np.random.default_rng(0)
    return {f"clip{i}": (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for i, s in enumerate(seconds)}


@pytest.mark.parametrize("kind", ["swiglu", "mlp2x_gelu"])
def test_clips_of_different_lengths_keep_only_their_own_frames(kind, tiny_whisper, tiny_llama):
    """A cached clip keeps ceil(samples / 320) frames; a batch of clips of different lengths gives every row the
    loss it has alone (padding frames never reach the LLM), cached or not."""
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset
    from modaltune.shared.skips import Skips

    model, tok, _ = _composed(tiny_whisper, tiny_llama, kind=kind)
    waves = _clips()
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    assert [cache.get(k).size(0) for k in waves] == [25, 65, 110]
    rows = [{"id": k, "input": k, "prompt": f"{AUDIO_PLACEHOLDER} say:", "target": f"word {i}"}
            for i, k in enumerate(waves)]
    cached = ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    plain = ComposedDataset(rows, tok, None, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    batch = ComposedCollator(tok.pad_token_id)([cached[i] for i in range(3)])
    assert batch["features"].shape[1] == 110 and batch["features_lengths"].tolist() == [25, 65, 110]
    raw = ComposedCollator(tok.pad_token_id, model.encoder, load=waves.__getitem__)([plain[i] for i in range(3)])
    assert raw["features_lengths"].tolist() == [25, 65, 110]
    model.eval()
    with torch.no_grad():
        together = model(**batch)["loss"].item()
        uncached = model(**raw)["loss"].item()
        alone = [model(**ComposedCollator(tok.pad_token_id)([cached[i]]))["loss"].item() for i in range(3)]
        embeds, mask, _ = model.embed(batch["input_ids"], batch["attention_mask"], batch["placeholder_positions"],
                                      features=batch["features"], features_lengths=batch["features_lengths"])
    text = [len(cached[i]["input_ids"]) for i in range(3)]
    assert mask.sum(1).tolist() == [t - 1 + n for t, n in zip(text, (4, 9, 14))]  # ceil(frames / 8) audio tokens
    assert together == pytest.approx(uncached, rel=1e-5)
    weights = [sum(t != -100 for t in cached[i]["labels"]) for i in range(3)]  # the loss is token-weighted
    assert together == pytest.approx(sum(a * w for a, w in zip(alone, weights)) / sum(weights), rel=1e-5)


def test_generation_of_a_mixed_length_batch_matches_each_clip_alone(tiny_whisper, tiny_llama):
    from modaltune.shared.compose_data import ComposedDataset, generate_composed
    from modaltune.shared.skips import Skips

    model, tok, _ = _composed(tiny_whisper, tiny_llama)
    waves = _clips()
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    rows = [{"id": k, "input": k, "prompt": f"{AUDIO_PLACEHOLDER} say:" + " more" * i, "target": "x"}
            for i, k in enumerate(waves)]
    ds = ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    together = generate_composed(model, tok, ds, batch_size=3, max_new_tokens=5)
    alone = [generate_composed(model, tok, ComposedDataset([r], tok, cache, placeholder=AUDIO_PLACEHOLDER,
                                                          max_length=64, skipped=Skips()), batch_size=1,
                               max_new_tokens=5)[0] for r in rows]
    assert together == alone


def _clip(cid, text="", **meta):
    from modaltune.audio.data import Clip

    return Clip(cid, np.zeros(160, dtype=np.float32), text, meta=meta)


def test_task_rows_give_transcripts_orders_and_manifest_tasks():
    clips = [_clip("a", "Start aspirin five milligrams daily.", slots={"drug": "aspirin", "dose": "five milligrams",
                                                                      "procedure": "x"}),
             _clip("b", "Chief complaint is asthma.", slots={"condition": "asthma"}),
             _clip("c", "", task="qa", prompt="What is asked?", answer="the dose")]
    rows = task_rows(clips, AudioTasksConfig(), train=False)
    assert [(r["input"], r["task"]) for r in rows] == [("a", "transcribe"), ("a", "orders"), ("b", "transcribe"),
                                                       ("c", "qa")]
    assert json.loads(rows[1]["target"]) == {"drug": "aspirin", "dose": "five milligrams"}  # only order keys
    assert all(r["prompt"].count(AUDIO_PLACEHOLDER) == 1 for r in rows)
    assert "What is asked?" in rows[3]["prompt"]
    drawn = {r["prompt"] for r in task_rows([clips[1]] * 40, AudioTasksConfig(phrasings=3), train=True)}
    assert len(drawn) == 3  # training draws among the first three phrasings
    assert order_answer({"condition": "asthma"}) is None
    only = task_rows(clips, AudioTasksConfig(orders=False, custom=False), train=False)
    assert {r["task"] for r in only} == {"transcribe"}


def test_shuffled_audio_moves_every_clip_and_keeps_the_prompts():
    rows = [{"id": f"{i}:t", "input": f"c{i}", "task": "t", "prompt": f"p{i}", "target": f"t{i}"} for i in range(7)]
    mixed = shuffled(rows, seed=3)
    assert all(m["input"] != r["input"] for m, r in zip(mixed, rows))
    assert sorted(m["input"] for m in mixed) == sorted(r["input"] for r in rows)
    assert [m["prompt"] for m in mixed] == [r["prompt"] for r in rows]


def test_order_scores_per_slot_all_slots_and_invalid_json():
    golds = [{"drug": "aspirin", "dose": "five milligrams"}, {"drug": "heparin"}, {"drug": "insulin"}]
    preds = ['{"drug": "Aspirin", "dose": "five milligrams"}', '{"drug": "heparin", "dose": "ten"}', "insulin"]
    m, rows = order_scores(preds, golds)
    assert m["orders/drug_accuracy"] == pytest.approx(2 / 3)
    assert m["orders/dose_accuracy"] == 1.0
    assert m["orders/all_slots"] == pytest.approx(1 / 3)  # the second names a dose it was not given
    assert m["orders/valid_json"] == pytest.approx(2 / 3)
    assert [r["valid_json"] for r in rows] == [True, True, False]


def test_a_row_without_transcript_is_kept_only_for_its_task(order_manifests):
    from modaltune.audio.data import ClipFilter, read_manifest, validate
    from modaltune.shared.skips import Skips

    rows = read_manifest(str(order_manifests["train"]))
    skipped = Skips()
    assert len(validate(rows, ClipFilter(), skipped)) == len(rows) - 1  # ASR: no transcript, no clip
    assert dict(skipped) == {"empty transcript": 1}
    kept = validate(rows, ClipFilter(), Skips(), need_text=False)
    assert kept[-1].text == "" and kept[-1].meta == {"task": "qa", "prompt": "Which drug?", "answer": "metformin"}
    assert kept[0].meta["slots"] == {"drug": "metformin", "frequency": "twice daily"}


def test_cascade_rows_put_the_transcript_in_the_prompt():
    rows = task_rows([_clip("a", "Give aspirin.", slots={"drug": "aspirin"})], AudioTasksConfig(), train=False)
    text = cascade_rows(rows, {"a": "give asprin"})
    assert len(text) == 1 and "Transcript: give asprin" in text[0]["prompt"] and AUDIO_PLACEHOLDER not in text[0]["prompt"]


@pytest.fixture()
def order_manifests(speech_manifests, tmp_path):
    """The speech fixture's clips with medication-order slots on some rows and a spoken-QA row."""
    out = {}
    for split, path in speech_manifests.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for i, row in enumerate(rows):
            row["audio"] = str(path.parent / row["audio"])
            if i % 2 == 0:
                row["slots"] = {"drug": "metformin", "frequency": "twice daily"}
        rows[-1].update(task="qa", prompt="Which drug?", answer="metformin")
        if split == "train":
            rows[-1]["text"] = ""  # a spoken question with no transcript: a task row all the same
        out[split] = tmp_path / f"{split}.jsonl"
        out[split].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def test_recipe_runs_evaluates_merges_and_the_merge_reloads(tiny_whisper, tiny_llama, order_manifests, tmp_path):
    from modaltune.shared.compose import load_composed
    from modaltune.shared.compose_data import ComposedDataset, generate_composed
    from modaltune.shared.recipe import execute, merge
    from modaltune.shared.skips import Skips

    overrides = [f"encoder.name={tiny_whisper}", f"model.name={tiny_llama}", f"data.source={order_manifests['train']}",
                 f"data.test={order_manifests['test']}", "stages[0].max_steps=3", "stages[1].max_steps=3",
                 "train.batch_size=4", "train.save_steps=2", "eval.max_new_tokens=6", "cascade.max_steps=2",
                 "cascade.language=en", "train.precision=fp32"]
    report, code = execute("audio-llm", mode="run", overrides=overrides, out=str(tmp_path / "run"))
    assert code == 0, report.get("error")
    after = report["metrics"]["after"]
    for key in ("test/wer", "test/wer_shuffled", "orders/drug_accuracy", "orders/drug_accuracy_shuffled",
                "orders/valid_json", "qa/accuracy", "qa/accuracy_shuffled"):
        assert key in after, key
    assert {"test/wer", "orders/drug_accuracy", "orders/valid_json"} <= set(report["metrics"]["cascade"])
    assert {"before", "after_projector", "after", "cascade"} <= set(report["metrics"])
    assert report["data"]["test rows"]["kept"] == 4 + 2 + 1  # 4 transcripts, 2 orders, 1 spoken question
    assert all(it["shuffled"] is not None for it in report["items"]) and report["plots"]
    stages = {s["stage"]: s for s in report["training"]["stages"]}
    assert set(stages) == {"projector", "tasks"}

    ev, code = execute("audio-llm", mode="eval", overrides=overrides, out=str(tmp_path / "eval"),
                       checkpoint=report["checkpoint"])
    assert code == 0, ev.get("error")
    assert ev["metrics"]["after"]["test/wer"] == pytest.approx(after["test/wer"])

    out = merge(report["checkpoint"], str(tmp_path / "merged"), log=lambda *_: None)
    model, tok, composition = load_composed(out, **QUIET)
    assert composition["placeholder"] == AUDIO_PLACEHOLDER
    from modaltune.audio.asr import ASRDataConfig, load_asr_sets

    sets, _ = load_asr_sets(ASRDataConfig(source=str(order_manifests["train"]), test=str(order_manifests["test"]),
                                          general=None), log=lambda *_: None)
    waves = {c.id: c.wave for c in sets["test"]}
    prompt = composition["template"].format(instruction="Transcribe the audio exactly.")
    rows = [{"id": k, "input": k, "prompt": prompt, "target": "x"} for k in waves]
    ds = ComposedDataset(rows, tok, None, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    merged_text = generate_composed(model, tok, ds, batch_size=4, max_new_tokens=6, encoder=model.encoder,
                                    load=waves.__getitem__)
    trained = {it["id"]: it["after"] for it in report["items"]}
    assert merged_text == [trained[f"{k}:transcribe"] for k in waves]  # the merge writes what the run wrote

    from modaltune.shared.errors import ModaltuneError
    from modaltune.shared.recipe import generate

    clip = sets["test"][0]  # `modaltune generate --input FILE` answers as the run did for that recording
    said = generate(report["checkpoint"], ["Transcribe the audio exactly."], clip.path, log=lambda *_: None)
    assert said == [trained[f"{clip.id}:transcribe"]]
    with pytest.raises(ModaltuneError, match="--input AUDIO"):
        generate(report["checkpoint"], ["Transcribe."], None, log=lambda *_: None)


def test_word_grounding_on_transcripts_ignores_padding_frames(tiny_whisper, tiny_gemma):
    """With ``norm=both`` and ``word_grounding``, transcription rows pull each clip's word tokens onto its
    transcript's words; a clip's grounding loss is the same alone as in a batch with a longer clip."""
    from modaltune.shared.compose import anchor_on_text
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset
    from modaltune.shared.skips import Skips

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="both", word_grounding=1.0, anchor_words=16)
    waves = _clips((0.4, 2.0))
    rows = task_rows([_clip(k, text) for k, text in zip(waves, ("take aspirin daily", "hold heparin today"))],
                     AudioTasksConfig(orders=False), train=False)
    assert all(r["type"] == "caption" for r in rows)  # a transcript describes its clip
    anchor_on_text(model, tok, [r["target"] for r in rows], 16, **QUIET)
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    ds = ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    collate = ComposedCollator(tok.pad_token_id)
    model.train()

    def grounding(items):
        batch = collate(items)
        plain = model.word_grounding
        with torch.no_grad():
            full = model(**batch)["loss"]
            model.word_grounding = 0.0
            lm_only = model(**batch)["loss"]
            model.word_grounding = plain
        return (full - lm_only).item()

    alone = grounding([ds[0]])
    assert alone > 0
    model.word_grounding = 1.0
    both = grounding([ds[0], ds[1]])
    second = grounding([ds[1]])
    assert both == pytest.approx((alone + second) / 2, rel=1e-4)  # per-row mean over real tokens only


def test_ctc_grounding_prefers_word_tokens_that_spell_the_transcript_in_order():
    """``projector.grounding: ctc``: word tokens that spell the target's anchor tokens in order (blanks between)
    cost less than the same words out of order; a projector built for it has the blank choice."""
    from modaltune.shared.compose import WordAnchoredProjector, build_projector, word_grounding_loss

    torch.manual_seed(0)
    words = torch.randn(4, 8)
    proj = WordAnchoredProjector(torch.nn.Identity(), words, blank=True)
    proj.set_words(words, [11, 12, 13, 14])
    proj.record = True
    proj.train()
    labels = torch.tensor([[-100, 11, 13, 12, 2]])  # anchors 0, 2, 1; token 2 (EOS) is no anchor
    rows = torch.tensor([True])

    def loss(order):
        logits = torch.full((1, 6, 5), -4.0)
        for t, j in enumerate(order):
            logits[0, t, j] = 4.0  # choice j at step t; 4 is the blank
        proj.last_weights = torch.softmax(logits, dim=-1)
        return word_grounding_loss(proj, labels, rows).item()

    right, wrong = loss([0, 4, 2, 4, 1, 4]), loss([1, 4, 2, 4, 0, 4])
    assert right < 0.5 < wrong
    built = build_projector("linear", in_dim=3, out_dim=8, group=2, norm="both", scale=1.0, words=words, blank=True)
    assert built.words.blank is not None and built(torch.randn(1, 5, 6)).shape == (1, 10, 8)
