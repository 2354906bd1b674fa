"""audio-llm: clips of different lengths through the composition core, speech tasks, the shuffled-audio guard and
the recipe end to end (run, eval, merge and reload) on tiny random models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from modaltune.audio.cascade import cascade_rows
from modaltune.audio.task_eval import order_scores
from modaltune.audio.tasks import AUDIO_PLACEHOLDER, AudioTasksConfig, order_answer, shuffled, task_rows
from modaltune.shared.features import FeatureCache

QUIET = {"log": lambda *_: None}


def _composed(tiny_whisper, llm_folder, **projector):
    from modaltune.shared.compose import EncoderConfig, ProjectorConfig, build_composed_lm
    from modaltune.shared.lm import ModelConfig
    from modaltune.shared.peft import ComponentConfig

    torch.manual_seed(0)
    return build_composed_lm(encoder=EncoderConfig(kind="whisper", name=str(tiny_whisper)), encoder_tuning=ComponentConfig(method="frozen"),
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
    from modaltune.recipes.audio_llm import AudioLLMConfig
    from modaltune.shared.compose_data import ComposedDataset, ComposedPrompts
    from modaltune.shared.generation import DecodingConfig, generate
    from modaltune.shared.skips import Skips

    def generate_composed(model, tok, ds, **decoding):
        return generate(model, tok, ComposedPrompts(ds, tok), DecodingConfig(**decoding), precision="fp32")

    model, tok, _ = _composed(tiny_whisper, tiny_llama)
    waves = _clips()
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    rows = [{"id": k, "input": k, "prompt": f"{AUDIO_PLACEHOLDER} say:" + " more" * i, "target": "x"}
            for i, k in enumerate(waves)]
    ds = ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    for beams in (1, 3):  # greedy and beam search (eval.num_beams) alike
        together = generate_composed(model, tok, ds, batch_size=3, max_new_tokens=5, num_beams=beams)
        alone = [generate_composed(model, tok, ComposedDataset([r], tok, cache, placeholder=AUDIO_PLACEHOLDER,
                                                              max_length=64, skipped=Skips()), batch_size=1,
                                   max_new_tokens=5, num_beams=beams)[0] for r in rows]
        assert together == alone

    seen, made = [], []  # eval.no_repeat_ngram reaches generate (0: off), and with 2 no token pair comes twice
    real_generate = model.generate
    model.generate = lambda **kw: seen.append((kw["generation_config"].no_repeat_ngram_size,
                                               kw["generation_config"].num_beams, len(kw["input_ids"]))) \
        or made.append(real_generate(**kw)) or made[-1]
    generate_composed(model, tok, ds, batch_size=3, max_new_tokens=12)
    generate_composed(model, tok, ds, batch_size=3, max_new_tokens=12, no_repeat_ngram=2)
    recipe = AudioLLMConfig().eval  # the recipe's defaults: no 6-gram twice
    generate(model, tok, ComposedPrompts(ds, tok), dataclasses.replace(recipe, max_new_tokens=12, num_beams=2,
                                                                       batch_size=2), precision="fp32")
    assert seen == [(0, 1, 3), (2, 1, 3), (6, 2, 2), (6, 2, 1)]  # the evaluation decodes with every eval.* setting
    for row in made[1].tolist():
        ids = [t for t in row if t not in (tok.pad_token_id, tok.eos_token_id)]
        assert len(ids) > 2 and len(set(zip(ids, ids[1:]))) == len(ids) - 1


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
    from transformers import AutoModel, AutoTokenizer

    from modaltune.shared.compose_data import ComposedDataset, ComposedPrompts
    from modaltune.shared.generation import DecodingConfig, generate
    from modaltune.shared.merge import merge
    from modaltune.shared.run import execute
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
    assert {"before", "after_words", "after", "cascade"} <= set(report["metrics"])
    assert all("test/words_wer" in report["metrics"][c] for c in ("before", "after_words", "after"))
    assert report["data"]["test rows"]["kept"] == 4 + 2 + 1  # 4 transcripts, 2 orders, 1 spoken question
    assert all(it["shuffled"] is not None for it in report["items"]) and report["plots"]
    # the main figures are what the report's own rows give: drug accuracy of the order rows, WER of the transcripts
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from modaltune.shared.metrics import word_error_rate

    orders = [it for it in report["items"] if it["task"] == "orders"]
    scored, _ = order_scores([it["after"] for it in orders], [json.loads(it["reference"]) for it in orders])
    assert len(orders) == 2 and after["orders/drug_accuracy"] == scored["orders/drug_accuracy"]
    heard = [it for it in report["items"] if it["task"] == "transcribe"]
    norm = EnglishTextNormalizer({})
    assert len(heard) == 4 and after["test/wer"] == pytest.approx(
        word_error_rate([norm(it["after"]) for it in heard], [norm(it["reference"]) for it in heard]), abs=1e-12)
    stages = {s["stage"]: s for s in report["training"]["stages"]}
    assert set(stages) == {"words", "tasks"}
    assert report["timing"]["heldout_seconds"] > 0  # the tasks stage learned from held-out readings (the default)

    ev, code = execute("audio-llm", mode="eval", overrides=overrides, out=str(tmp_path / "eval"),
                       checkpoint=report["checkpoint"])
    assert code == 0, ev.get("error")
    assert ev["metrics"]["after"]["test/wer"] == pytest.approx(after["test/wer"])

    out = merge(report["checkpoint"], str(tmp_path / "merged"), log=lambda *_: None)
    model, tok = AutoModel.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))
    assert model.config.placeholder == AUDIO_PLACEHOLDER
    from modaltune.audio.asr import ASRDataConfig, load_asr_sets

    sets, _ = load_asr_sets(ASRDataConfig(source=str(order_manifests["train"]), test=str(order_manifests["test"]),
                                          general=None), log=lambda *_: None)
    waves = {c.id: c.wave for c in sets["test"]}
    prompt = model.config.template.format(instruction="Transcribe the audio exactly.")
    rows = [{"id": k, "input": k, "prompt": prompt, "target": "x"} for k in waves]
    ds = ComposedDataset(rows, tok, None, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    merged_text = generate(model, tok, ComposedPrompts(ds, tok, encoder=model.encoder, load=waves.__getitem__),
                           DecodingConfig(batch_size=4, max_new_tokens=6), precision="fp32")
    trained = {it["id"]: it["after"] for it in report["items"]}
    assert merged_text == [trained[f"{k}:transcribe"] for k in waves]  # the merge writes what the run wrote

    from modaltune.shared.errors import ModaltuneError
    from modaltune.shared.generate_cli import generate

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
    from modaltune.shared.compose import (ProjectorOutput, WordAnchoredProjector, WordChoices, build_projector,
                                          word_grounding_loss)

    torch.manual_seed(0)
    words = torch.randn(4, 8)
    proj = WordAnchoredProjector(torch.nn.Identity(), words, blank=True)
    proj.set_words(words, [11, 12, 13, 14])
    proj.train()
    labels = torch.tensor([[-100, 11, 13, 12, 2]])  # anchors 0, 2, 1; token 2 (EOS) is no anchor
    rows = torch.tensor([True])

    def loss(order):
        logits = torch.full((1, 6, 5), -4.0)
        for t, j in enumerate(order):
            logits[0, t, j] = 4.0  # choice j at step t; 4 is the blank
        out = ProjectorOutput(torch.zeros(1, 6, 8), aux=WordChoices(torch.softmax(logits, dim=-1)))
        return word_grounding_loss(proj, out, labels, rows).item()

    right, wrong = loss([0, 4, 2, 4, 1, 4]), loss([1, 4, 2, 4, 0, 4])
    assert right < 0.5 < wrong
    built = build_projector("linear", in_dim=3, out_dim=8, group=2, norm="both", scale=1.0, words=words, blank=True)
    assert built.words.blank is not None and built(torch.randn(1, 5, 6)).tokens.shape == (1, 10, 8)


def test_collapse_keeps_the_word_tokens_a_greedy_ctc_reading_keeps():
    """``projector.collapse``: a word token is shown when its best choice is a word, not blank, and not the word
    of the token before (repeats merge, as a CTC decoder reads them)."""
    from modaltune.shared.compose import WordAnchoredProjector

    words = torch.eye(4, 8)
    proj = WordAnchoredProjector(torch.nn.Identity(), words, blank=True, collapse=True)
    with torch.no_grad():
        proj.blank.weight.zero_()
        proj.blank.bias.zero_()
        proj.blank.weight[0, 7] = 10.0  # coordinate 7 says "no word"
    choices = [0, 0, "blank", 2, 2, "blank", 2, 1]
    x = torch.zeros(1, len(choices), 8)
    for t, c in enumerate(choices):
        x[0, t, 7 if c == "blank" else c] = 10.0
    out = proj(x)
    assert out.shown.tolist() == [[True, False, False, True, False, False, True, True]]
    assert out.aux.chosen.tolist() == [[0, 0, 4, 2, 2, 4, 2, 1]]  # 4: the blank
    with pytest.raises(Exception, match="blank"):
        WordAnchoredProjector(torch.nn.Identity(), words, blank=False, collapse=True)


def _two_clips(model, tok):
    """Two transcribed clips for a word-anchored model: anchors on their text, their cached states, their rows."""
    from modaltune.shared.compose import anchor_on_text
    from modaltune.shared.compose_data import ComposedDataset
    from modaltune.shared.skips import Skips

    waves = _clips((0.4, 2.0))
    rows = task_rows([_clip(k, text) for k, text in zip(waves, ("take aspirin daily", "hold heparin today"))],
                     AudioTasksConfig(orders=False), train=False)
    anchor_on_text(model, tok, [r["target"] for r in rows], 16, **QUIET)
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    return waves, cache, ComposedDataset(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64,
                                         skipped=Skips())


def test_collapsed_prompts_hold_the_kept_words_and_every_feature_token(tiny_whisper, tiny_gemma):
    """With ``collapse``, a row's prompt holds its kept word tokens (only real frames) and all its real feature
    tokens; the grounding loss still sees every word token of the clip."""
    from modaltune.shared.compose import EncoderBatch, read_words
    from modaltune.shared.compose_data import ComposedCollator

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="both", word_grounding=1.0, anchor_words=16,
                              grounding="ctc", collapse=True)
    waves, cache, ds = _two_clips(model, tok)
    batch = ComposedCollator(tok.pad_token_id)([ds[0], ds[1]])
    model.eval()
    with torch.no_grad():
        out = model.project(EncoderBatch(features=batch["features"], features_lengths=batch["features_lengths"]))
        kept, real = out.shown, out.real
        m = kept.size(1)
        _, mask, _ = model.embed(batch["input_ids"], batch["attention_mask"], batch["placeholder_positions"],
                                 features=batch["features"], features_lengths=batch["features_lengths"])
    prompt = batch["attention_mask"].sum(1) - 1
    expected = prompt + (kept & real[:, :m]).sum(1).clamp(min=1) + real[:, m:].sum(1)
    assert mask.sum(1).tolist() == expected.tolist()
    assert (kept & real[:, :m]).sum(1).tolist() != real[:, :m].sum(1).tolist()  # something was dropped
    read = read_words(model, [cache.get(k) for k in waves])  # each clip alone: the words the LLM is shown
    anchors = set(model.projector.words.word_ids.tolist())
    assert [len(r) for r in read] == (kept & real[:, :m]).sum(1).tolist() and all(t in anchors for r in read for t in r)
    model.train()
    assert model(**batch)["loss"].requires_grad  # training with the CTC loss over the uncollapsed tokens runs


def test_a_grounding_stage_trains_the_projector_without_running_the_llm(tiny_whisper, tiny_gemma, monkeypatch):
    """``loss: grounding``: the batch's loss is the weighted word-grounding loss alone, the LLM never runs, and
    only projector weights get gradients."""
    from modaltune.shared.compose import EncoderBatch, word_grounding_loss
    from modaltune.shared.compose_data import ComposedCollator, stage_collator

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="both", word_grounding=0.5, anchor_words=16,
                              grounding="ctc")
    waves, cache, ds = _two_clips(model, tok)
    plain = ComposedCollator(tok.pad_token_id)
    assert stage_collator("model", plain) is None
    batch = stage_collator("grounding", plain)([ds[0], ds[1]])
    assert batch["objective"] == "grounding"
    model.train()
    torch.manual_seed(1)
    out = model.project(EncoderBatch(features=batch["features"], features_lengths=batch["features_lengths"]))
    expected = 0.5 * word_grounding_loss(model.projector, out, batch["labels"], batch["ground_words"])

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM ran in a grounding stage")

    monkeypatch.setattr(model.llm, "forward", no_llm)
    loss = model(**batch)["loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"projector"}


def test_heldout_readings_replace_the_words_the_llm_is_shown(tiny_whisper, tiny_gemma):
    """A batch's ``readings`` are what the LLM is shown in place of the projector's own word tokens: given the
    model's own reading the loss is unchanged, given another it changes; the grounding loss still reaches the
    projector through the clip's own tokens."""
    from modaltune.shared.compose import read_tokens
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset
    from modaltune.shared.errors import DataError
    from modaltune.shared.skips import Skips

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="words", word_grounding=1.0, anchor_words=16,
                              grounding="ctc", collapse=True)
    waves, cache, ds = _two_clips(model, tok)
    own = dict(zip(waves, read_tokens(model, [cache.get(k) for k in waves])))
    assert all(t.ndim == 2 and t.size(0) >= 1 and t.size(1) == model.config.text_config.hidden_size for t in own.values())
    collate = ComposedCollator(tok.pad_token_id)

    asked = [{**r, "type": "orders"} for r in ds.rows]  # readings stand in on rows that are not the clip's transcript

    def loss(readings):
        data = ComposedDataset(asked, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips(),
                               readings=readings)
        batch = collate([data[0], data[1]])
        assert ("readings" in batch) == (readings is not None)
        model.eval()
        with torch.no_grad():
            return model(**batch)["loss"].item()

    plain = loss(None)
    assert loss(own) == pytest.approx(plain, rel=1e-5)
    torch.manual_seed(2)
    other = {k: 30.0 * torch.randn(v.size(0) + 3, v.size(1)) for k, v in own.items()}
    assert abs(loss(other) - plain) > 1e-3
    # rows of other tasks only: the transcript row keeps the model's own reading
    mixed = [dict(ds.rows[0]), {**ds.rows[1], "type": "orders"}]
    data = ComposedDataset(mixed, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips(),
                           readings=other)
    batch = collate([data[0], data[1]])
    assert batch["readings_rows"].tolist() == [False, True]
    model.eval()
    with torch.no_grad():
        first, second = (model(**collate([data[i]]))["loss"].item() for i in range(2))
        alone = [_loss_of(model, collate, ds, i) for i in range(2)]
    assert first == pytest.approx(alone[0], rel=1e-5) and abs(second - alone[1]) > 1e-3
    together = ComposedDataset(mixed, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips(),
                               readings=own)
    with torch.no_grad():  # own readings on one row, the model's own tokens on the other: the plain batch loss
        assert model(**collate([together[0], together[1]]))["loss"].item() == pytest.approx(plain, rel=1e-5)
    with pytest.raises(DataError, match="no held-out reading of 1 inputs"):
        ComposedDataset(asked, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips(),
                        readings={list(waves)[0]: own[list(waves)[0]]})
    model.train()
    data = ComposedDataset(mixed, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips(),
                           readings=other)
    model(**collate([data[0], data[1]]))["loss"].backward()
    assert next(model.projector.inner.parameters()).grad.abs().sum() > 0  # the CTC loss trains the reader


def _loss_of(model, collate, data, i):
    with torch.no_grad():
        return model(**collate([data[i]]))["loss"].item()


def test_each_heldout_reader_never_trains_on_the_inputs_it_reads(tiny_whisper, tiny_gemma):
    """Cross-fitting: every input is left out of exactly one fold reader's training, that reader reads it, and the
    projector comes back with its weights and trainability unchanged."""
    from modaltune.shared.compose import heldout_readings
    from modaltune.shared.compose_data import ComposedDataset
    from modaltune.shared.skips import Skips

    model, tok, _ = _composed(tiny_whisper, tiny_gemma, norm="words", word_grounding=1.0, anchor_words=16,
                              grounding="ctc", collapse=True)
    waves = _clips((0.4, 0.9, 1.3, 2.0))
    texts = ("take aspirin daily", "hold heparin today", "start insulin now", "stop warfarin soon")
    rows = task_rows([_clip(k, t) for k, t in zip(waves, texts)], AudioTasksConfig(orders=False), train=False)
    from modaltune.shared.compose import anchor_on_text

    anchor_on_text(model, tok, list(texts), 16, **QUIET)
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))

    seen, bounds = [], [0]  # the inputs of the training batches; where each fold's log line came

    class Spy(ComposedDataset):
        def __getitem__(self, i):
            seen.append(self.items[i]["input"])
            return super().__getitem__(i)

    data = Spy(rows, tok, cache, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    model.projector.requires_grad_(False)
    readings = heldout_readings(model, data, list(waves), folds=2, steps=12, lr=1e-2, batch_size=2, seed=0,
                                log=lambda _: bounds.append(len(seen)))
    folds = [set(seen[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert set(readings) == set(waves) and len(folds) == 2
    assert all(len(f) == 2 for f in folds) and not folds[0] & folds[1]  # each reader trained on the other half
    assert all(torch.equal(v, before[k]) for k, v in model.projector.state_dict().items())
    assert not any(p.requires_grad for p in model.projector.parameters())
    again = heldout_readings(model, data, list(waves), folds=2, steps=12, lr=1e-2, batch_size=2, seed=0, **QUIET)
    assert all(torch.equal(readings[k], again[k]) for k in waves)  # deterministic


def test_heldout_config_is_checked_against_stages_and_projector():
    from modaltune.recipes.audio_llm import AudioLLMConfig
    from modaltune.shared.compose import check_heldout
    from modaltune.shared.config import ConfigError, from_dict

    cfg = from_dict(AudioLLMConfig, {}, "")
    used, steps, lr = check_heldout(cfg.heldout, cfg.stages, cfg.projector, cfg.train)
    assert used == ["tasks"] and (steps, lr) == (cfg.stages[0].max_steps // 2, cfg.stages[0].lr)  # as many epochs
    assert check_heldout(from_dict(AudioLLMConfig, {"heldout": {"folds": 0}}, "").heldout, cfg.stages,
                         cfg.projector, cfg.train)[0] == []
    custom = from_dict(AudioLLMConfig, {"projector": {"lr": 2e-3}, "stages": [
        {"name": "words", "data": "transcribe", "loss": "grounding", "max_steps": 90},
        {"name": "tasks", "data": "all", "components": ["projector", "llm"]}]}, "")
    assert check_heldout(custom.heldout, custom.stages, custom.projector, custom.train)[1:] == (45, 2e-3)  # as words trains
    with pytest.raises(ConfigError, match="heldout.steps is needed"):  # a grounding stage that trains by epochs
        from_dict(AudioLLMConfig, {"stages": [{"name": "words", "data": "transcribe", "loss": "grounding",
                                               "max_steps": -1}, {"name": "tasks", "data": "all"}]}, "")
    with pytest.raises(ConfigError, match="folds must be 0"):
        from_dict(AudioLLMConfig, {"heldout": {"folds": 1}}, "")
    with pytest.raises(ConfigError, match="'answers', which is not a stage"):
        from_dict(AudioLLMConfig, {"heldout": {"stages": ["answers"]}}, "")
    with pytest.raises(ConfigError, match="stage 'words' has loss: grounding"):
        from_dict(AudioLLMConfig, {"heldout": {"stages": ["words"]}}, "")
    with pytest.raises(ConfigError, match="needs a reading to hold out"):
        from_dict(AudioLLMConfig, {"projector": {"norm": "both"}}, "")


def test_stage_loss_is_checked_by_the_config():
    """A stage's ``loss`` is model or grounding; text-dpo, which has no projector, refuses grounding."""
    from modaltune.shared.config import ConfigError, from_dict
    from modaltune.recipes.text_dpo import TextDPOConfig
    from modaltune.shared.training import StageConfig

    with pytest.raises(ConfigError, match="loss must be model or grounding"):
        from_dict(StageConfig, {"loss": "ctc"}, "stages[0]")
    with pytest.raises(ConfigError, match="no projector"):
        from_dict(TextDPOConfig, {"stages": [{"name": "sft", "data": "instructions", "loss": "grounding"},
                                             {"name": "dpo", "data": "pairs"}]}, "")
    from modaltune.recipes.audio_llm import AudioLLMConfig
    from modaltune.recipes.med_vqa import MedVQAConfig

    words = [{"name": "words", "data": "transcribe", "loss": "grounding"}]
    assert from_dict(AudioLLMConfig, {"stages": words}, "").stages[0].loss == "grounding"
    with pytest.raises(ConfigError, match=r"stages\[0\].loss=grounding .* has none"):  # no word tokens to ground
        from_dict(AudioLLMConfig, {"stages": words, "projector": {"norm": "rms", "collapse": False}}, "")
    with pytest.raises(ConfigError, match="no_repeat_ngram must be 0"):
        from_dict(AudioLLMConfig, {"eval": {"no_repeat_ngram": -1}}, "")
    with pytest.raises(ConfigError, match="num_beams must be 1"):
        from_dict(AudioLLMConfig, {"eval": {"num_beams": 0}}, "")
    with pytest.raises(ConfigError, match="on a caption stage"):  # med-vqa grounds on captions only
        from_dict(MedVQAConfig, {"stages": [{"name": "vqa", "data": "vqa", "loss": "grounding"}]}, "")


@pytest.mark.parametrize("steps", [3, 40, 300])
def test_a_fold_reader_trains_on_transformers_cosine_schedule_one_step_ahead(steps):
    """The held-out readers' schedule (the audio-llm default runs use it): 5% linear warm-up then cosine to 0, with
    the first step at lr / warm-up steps, where transformers' own starts at 0."""
    from transformers import get_cosine_schedule_with_warmup

    from modaltune.shared.compose import reader_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(opt, max(1, round(0.05 * steps)), steps).lr_lambdas[0]
    assert [reader_schedule(s, steps) for s in range(steps)] == pytest.approx([hf(s + 1) for s in range(steps)])
    assert reader_schedule(0, steps) > 0 and reader_schedule(steps - 1, steps) == pytest.approx(0.0, abs=1e-12)
