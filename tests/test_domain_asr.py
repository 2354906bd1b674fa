"""Whisper fine-tuning on a tiny random Whisper: methods, encoder cache, save/load/merge, recipe, bad input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from modaltune.audio.whisper import WhisperModelConfig, build_whisper, label_ids, whisper_components
from modaltune.shared.errors import ConfigError, ModaltuneError

METHODS = [("frozen", "lora"), ("frozen", "dora"), ("frozen", "qlora"), ("frozen", "lora8bit"), ("frozen", "ia3"),
           ("frozen", "full"), ("lora", "lora"), ("full", "full"), ("lora", "frozen")]


def _build(folder, enc="frozen", dec="lora"):
    comps = whisper_components()
    comps = {"encoder": dataclasses.replace(comps["encoder"], method=enc, r=4),
             "decoder": dataclasses.replace(comps["decoder"], method=dec, r=4)}
    torch.manual_seed(0)
    return build_whisper(WhisperModelConfig(name=str(folder)), comps, compute_dtype=torch.float32)


def _batch(processor, n=2):
    from modaltune.audio.features import ASRCollator, log_mel

    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(16000).astype(np.float32) for _ in range(n)]
    labels = [label_ids(processor, "the patient reports chest pain")[: 6 + i] for i in range(n)]
    batch = ASRCollator()([{"labels": lab, "input_features": f} for lab, f in zip(labels, log_mel(processor, waves))])
    return waves, labels, batch


@pytest.mark.parametrize("enc, dec", METHODS)
def test_each_method_trains_only_its_components(enc, dec, tiny_whisper):
    model, processor, _ = _build(tiny_whisper, enc, dec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, batch = _batch(processor)
    model.train()
    loss = model(**batch)["loss"]
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= model.trained_names
    comps = {model.component_of(n) for n in changed}
    expected = {c for c, m in (("encoder", enc), ("decoder", dec)) if m != "frozen"}
    assert comps == expected, (comps, expected)
    report = model.parameter_report()
    if enc == "frozen":
        assert report["encoder"]["trainable"] == 0


def test_cached_and_uncached_paths_give_the_same_loss(tiny_whisper):
    from modaltune.audio.features import ASRCollator, ASRDataset
    from modaltune.shared.features import FeatureCache

    model, processor, _ = _build(tiny_whisper)
    waves, labels, _ = _batch(processor, 3)
    cache = FeatureCache(model)
    cached = ASRDataset(waves, labels, processor, cache=cache)
    plain = ASRDataset(waves, labels, processor)
    assert cache.computed == 3
    model.eval()
    with torch.no_grad():
        a = model(**ASRCollator()([cached[i] for i in range(3)]))["loss"]
        b = model(**ASRCollator()([plain[i] for i in range(3)]))["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    ASRDataset(waves, labels, processor, cache=cache)  # same audio: nothing recomputed
    assert cache.computed == 3


def test_disk_cache_is_keyed_by_content_and_encoder(tiny_whisper, tmp_path):
    from modaltune.shared.features import FeatureCache

    model, processor, _ = _build(tiny_whisper)
    waves, _, _ = _batch(processor, 2)
    first = FeatureCache(model, directory=tmp_path)
    first.fill(waves)
    second = FeatureCache(model, directory=tmp_path)
    second.fill(waves)
    assert first.computed == 2 and second.computed == 0 and second.loaded == 2
    other, _, _ = _build(tiny_whisper, "lora", "lora")
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    third = FeatureCache(other, directory=tmp_path)
    third.fill(waves)
    assert third.computed == 2  # a different encoder never reuses another's states


def test_target_matching_nothing_names_the_component(tiny_whisper):
    comps = whisper_components()
    comps["decoder"] = dataclasses.replace(comps["decoder"], targets=["query"])
    with pytest.raises(ConfigError, match="'query' of component 'decoder'.*q_proj"):
        build_whisper(WhisperModelConfig(name=str(tiny_whisper)), comps)


def test_recipe_run_eval_merge_and_pipeline(tmp_path, tiny_whisper, speech_manifests):
    from transformers import pipeline

    from modaltune.shared.cli import main

    out = tmp_path / "run"
    args = ["run", "domain-asr", "--out", str(out), f"model.name={tiny_whisper}",
            f"data.source={speech_manifests['train']}", f"data.test={speech_manifests['test']}",
            "data.general=null", "data.terms=null", "train.max_steps=3", "train.batch_size=4",
            "train.save_steps=2", "train.logging_steps=1", "train.precision=fp32", "eval.max_new_tokens=8",
            "augment.views=1", "augment.speed=[]", "replay.kl_weight=0.5"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert set(before) == set(after) and "test/wer" in after and "test/cer_raw" in after and "test/rtf" in after
    assert report["model"]["encoder_cache"] is True
    assert report["data"]["train"]["examples_with_views"] == 2 * report["data"]["train"]["kept"]
    assert 1 <= report["data"]["train"]["replay_clips"] < report["data"]["train"]["kept"]
    assert (out / "wer.png").exists() and "wer.png" in json.dumps(report["plots"])
    assert {"test/wer@s0", "test/wer@s1"} <= set(after)  # per-speaker WER, in every column, with its own plot
    assert (out / "wer_by_speaker.png").exists() and "wer_by_speaker.png" in json.dumps(report["plots"])
    assert report["items"] and {"reference", "zero_shot", "fine_tuned", "wer", "errors"} <= set(report["items"][0])
    # test WER is what the report's own rows give: their transcripts through Whisper's English normaliser (the
    # tiny model is English-only), pooled over the test clips
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    from modaltune.shared.metrics import word_error_rate

    norm = EnglishTextNormalizer({})
    test_rows = [it for it in report["items"] if it["set"] == "test"]
    assert len(test_rows) == report["data"]["test"]["kept"]
    refs = [norm(it["reference"]) for it in test_rows]
    for column, metrics in (("zero_shot", before), ("fine_tuned", after)):
        hyps = [it[column] for it in test_rows]
        assert metrics["test/wer"] == pytest.approx(word_error_rate([norm(h) for h in hyps], refs), abs=1e-12)
        assert metrics["test/wer_raw"] == pytest.approx(
            word_error_rate(hyps, [it["reference"] for it in test_rows]), abs=1e-12)
    for it in test_rows:
        assert it["wer"] == pytest.approx(word_error_rate([norm(it["fine_tuned"])], [norm(it["reference"])]), abs=1e-4)

    assert main(["eval", "domain-asr", "--checkpoint", str(out / "checkpoint"), "--out", str(tmp_path / "ev"),
                 "eval.max_new_tokens=8"]) == 0
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert ev["metrics"]["after"]["test/wer"] == pytest.approx(after["test/wer"])

    merged = tmp_path / "merged"
    assert main(["merge", "--checkpoint", str(out / "checkpoint"), "--out", str(merged)]) == 0
    asr = pipeline("automatic-speech-recognition", model=str(merged), device="cpu")
    text = asr(np.zeros(16000, dtype=np.float32), generate_kwargs={"max_new_tokens": 8})["text"]
    assert isinstance(text, str)

    # its decoder adapter combines like any other: alone at weight 1, a plain PEFT adapter with the merged outputs
    import peft
    from transformers import WhisperForConditionalGeneration

    assert main(["combine", "--adapter", f"{out / 'checkpoint'}:decoder", "--out", str(tmp_path / "comb")]) == 0
    base = WhisperForConditionalGeneration.from_pretrained(str(tiny_whisper)).eval()
    combined = peft.PeftModel.from_pretrained(base, str(tmp_path / "comb")).eval()
    plain = WhisperForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32).eval()
    feats = torch.randn(1, base.config.num_mel_bins, 2 * base.config.max_source_positions,
                        generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[base.config.decoder_start_token_id, 5, 6, 7]])
    with torch.no_grad():
        want = plain(input_features=feats, decoder_input_ids=ids).logits
        assert (combined(input_features=feats, decoder_input_ids=ids).logits - want).abs().max() < 1e-4
        with combined.disable_adapter():  # and the adapter is what moves them
            assert (combined(input_features=feats, decoder_input_ids=ids).logits - want).abs().max() > 1e-3
    # the checkpoint's own PEFT folder (one for Whisper's wrapper, both components) loads outside modaltune
    folder = out / "checkpoint" / "adapter" / "whisper"
    saved = peft.PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(str(tiny_whisper)),
                                           str(folder)).eval()
    with torch.no_grad():
        assert (saved(input_features=feats, decoder_input_ids=ids).logits - want).abs().max() < 1e-4

    from modaltune.shared.generate_cli import generate

    row = json.loads(speech_manifests["test"].read_text().splitlines()[0])  # `modaltune generate --input FILE`
    wav = speech_manifests["test"].parent / row["audio"]
    (said,) = generate(str(out / "checkpoint"), [], str(wav), overrides=["eval.max_new_tokens=8"], log=lambda *_: None)
    assert said.strip() == next(it["fine_tuned"] for it in report["items"] if it["reference"] == row["text"]).strip()
    with pytest.raises(ModaltuneError, match="takes no prompt"):
        generate(str(out / "checkpoint"), ["hello"], str(wav), log=lambda *_: None)


def test_validation_counts_every_failure_mode(tmp_path):
    from collections import Counter

    import soundfile as sf

    from modaltune.audio.data import ClipFilter, read_manifest, validate
    from modaltune.shared.skips import Skips

    sr = 16000
    sf.write(tmp_path / "ok.wav", (0.2 * np.sin(np.arange(sr) / 5)).astype(np.float32), sr)
    sf.write(tmp_path / "silent.wav", np.zeros(sr, dtype=np.float32), sr)
    sf.write(tmp_path / "long.wav", (0.2 * np.sin(np.arange(31 * sr) / 5)).astype(np.float32), sr)
    sf.write(tmp_path / "stereo44k.wav", (0.2 * np.random.default_rng(0).standard_normal((44100, 2))).astype(np.float32), 44100)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), sr)
    rows = [
        {"audio": "ok.wav", "text": "fine"}, {"audio": "silent.wav", "text": "x"}, {"audio": "long.wav", "text": "x"},
        {"audio": "corrupt.wav", "text": "x"}, {"audio": "missing.wav", "text": "x"}, {"audio": "ok.wav", "text": " "},
        {"audio": "empty.wav", "text": "x"}, {"audio": "stereo44k.wav", "text": "resampled"},
        {"audio": "long.wav", "text": "split me", "segments": [{"start": 0, "end": 12, "text": "part one"},
                                                                {"start": 12, "end": 31, "text": "part two"}]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    skipped = Skips()
    clips = validate(read_manifest(str(manifest)), ClipFilter(long_clips="split"), skipped)
    assert [c.text for c in clips] == ["fine", "resampled", "part one", "part two"]
    assert clips[1].wave.shape == (16000,)
    assert skipped == Counter({"silence": 1, "longer than 30 s (the model's window)": 1, "unreadable audio": 1,
                               "missing audio file": 1, "empty transcript": 1, "empty audio": 1})
    assert skipped.names["silence"] == ["m.jsonl:2"] and skipped.names["missing audio file"] == ["m.jsonl:5"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "ok.wav", "text": "a"}\nnot json\n')
    from modaltune.shared.errors import DataError

    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_manifest(str(bad))


def test_truncated_short_and_outside_clips_are_named_skips(tmp_path):
    import soundfile as sf

    from modaltune.audio.data import ClipFilter, read_manifest, validate
    from modaltune.shared.skips import Skips

    sr = 16000
    voice = (0.2 * np.sin(np.arange(3 * sr) / 5)).astype(np.float32)
    sf.write(tmp_path / "ok.wav", voice, sr, subtype="PCM_16")
    whole = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 3])  # the header still says 3 s; 1 s decodes
    (tmp_path / "tail.wav").write_bytes(whole[:-64])  # 32 samples short: an incomplete last block, not a cut file
    sf.write(tmp_path / "blip.wav", voice[:160], sr)  # 10 ms
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere.wav"
    sf.write(outside, voice, sr)
    sub = tmp_path / "set"
    sub.mkdir()
    rows = [{"audio": "../ok.wav", "text": "climbs out"}, {"audio": str(outside), "text": "absolute"},
            {"audio": "../cut.wav", "text": "cut"}, {"audio": "../blip.wav", "text": "blip"},
            {"audio": "../tail.wav", "text": "tail"}]
    (sub / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = Skips()
    clips = validate(read_manifest(str(sub / "m.jsonl")), ClipFilter(), skipped)
    assert [c.text for c in clips] == ["climbs out", "absolute", "tail"]  # a local tool follows any path by default
    assert skipped == {"truncated audio": 1, "shorter than 0.1 s": 1}
    assert skipped.names == {"truncated audio": ["m.jsonl:3"], "shorter than 0.1 s": ["m.jsonl:4"]}
    skipped = Skips()
    clips = validate(read_manifest(str(sub / "m.jsonl")), ClipFilter(root_only=True), skipped)
    assert clips == []
    reason = "audio path outside the manifest's folder (data.root_only)"
    assert skipped[reason] == 5 and skipped.names[reason][1] == f"m.jsonl:2: {outside}"


def test_wer_cer_and_term_recall_on_hand_checked_examples():
    from modaltune.audio.eval import make_normalizer, score, speaker_wer
    from modaltune.shared.metrics import alignment

    _, norm = make_normalizer("auto", english=True)
    m = score(["Start Metformin, 500 mg.", "he has a fever"], ["start metformin five hundred milligrams",
                                                              "he has fever"], 1.0, 4.0, normalizer=norm,
              terms=["metformin"])
    assert m["term_recall"] == 1.0 and m["rtf"] == 0.25
    assert m["wer_raw"] > m["wer"]  # case and punctuation count against the raw score only
    a = alignment("he has a fever", "he has fever")
    assert (a["substitutions"], a["deletions"], a["insertions"]) == (0, 0, 1)
    by = speaker_wer(["Take aspirin.", "take the aspirin", "give heparin now"],
                     ["take aspirin", "take aspirin", "give heparin"], ["a", "b", "a"], normalizer=norm)
    assert by == {"wer@a": pytest.approx(1 / 4), "wer@b": pytest.approx(1 / 2)}  # 1 insertion in 4 words; 1 in 2
    assert speaker_wer(["x"], ["y"], ["only"], normalizer=norm) == {}  # one speaker: the set WER says it all
    import doctest

    import modaltune.audio.eval as eval_module

    assert doctest.testmod(eval_module).failed == 0


def _build_top(folder, layers, method="lora"):
    comps = whisper_components()
    comps = {"encoder": dataclasses.replace(comps["encoder"], method=method, r=4, layers=layers),
             "decoder": dataclasses.replace(comps["decoder"], r=4)}
    torch.manual_seed(0)
    return build_whisper(WhisperModelConfig(name=str(folder)), comps, compute_dtype=torch.float32)


def test_encoder_layers_narrow_the_method_to_the_top_block_and_set_the_cache_depth(tiny_whisper):
    model, _, _ = _build_top(tiny_whisper, [-1])
    enc = {n for n in model.trained_names if model.component_of(n) == "encoder"}
    assert enc and all(".layers.1." in n for n in enc)
    assert model.cache_depth() == 1
    full, _, _ = _build_top(tiny_whisper, [1], method="full")
    enc = {n for n in full.trained_names if full.component_of(n) == "encoder"}
    assert enc and all(".layers.1." in n for n in enc) and not any("conv" in n for n in enc)
    assert full.cache_depth() == 1
    assert _build(tiny_whisper, "lora", "lora")[0].cache_depth() == 0  # the convolutions' output is still cached
    assert _build(tiny_whisper, "full", "lora")[0].cache_depth() is None  # the convolutions train: nothing to cache
    assert _build(tiny_whisper)[0].cache_depth() == 2  # frozen encoder: its output is cached
    with pytest.raises(ConfigError, match=r"block 5 does not exist; the component has 2 blocks"):
        _build_top(tiny_whisper, [5])


def test_partial_encoder_cache_gives_the_uncached_loss_gradients_and_transcripts(tiny_whisper):
    from modaltune.audio.eval import ASREvalConfig, transcribe
    from modaltune.audio.features import ASRCollator, ASRDataset
    from modaltune.shared.features import FeatureCache

    model, processor, _ = _build_top(tiny_whisper, [-1])
    with torch.no_grad():  # non-zero adapters, so the top block really differs from the base model's
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    waves, labels, _ = _batch(processor, 3)
    cache = FeatureCache(model, depth=model.cache_depth())
    assert not cache.complete and cache.depth == 1
    cached = ASRCollator()([ASRDataset(waves, labels, processor, cache=cache)[i] for i in range(3)])
    plain = ASRCollator()([ASRDataset(waves, labels, processor)[i] for i in range(3)])
    assert cached["features_depth"] == 1
    model.eval()
    grads = []
    for batch in (cached, plain):
        model.zero_grad()
        loss = model(**batch)["loss"]
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.requires_grad and ".encoder." in n}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][name], rtol=1e-4, atol=1e-6), name
    for beams in (1, 3):  # beam search once expanded cached states in place, call after call
        cfg = ASREvalConfig(max_new_tokens=6, num_beams=beams)
        with_cache, _ = transcribe(model, processor, waves, cfg, precision="fp32", language=None, task=None, cache=cache)
        without, _ = transcribe(model, processor, waves, cfg, precision="fp32", language=None, task=None)
        assert with_cache == without, beams
    # the cache of the frozen part survives training of the top block: its key ignores the trained weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    assert FeatureCache(model, depth=1).fingerprint == cache.fingerprint
    assert FeatureCache(model, depth=2).fingerprint != cache.fingerprint


def test_beam_search_skips_the_cross_attention_reorder_and_matches_stock_generate(tiny_whisper):
    from modaltune.audio.eval import ASREvalConfig, transcribe
    from modaltune.audio.features import log_mel

    model, processor, _ = _build(tiny_whisper)
    with torch.no_grad():  # non-zero adapters: beams disagree, so a wrong reorder changes the transcripts
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rng = np.random.default_rng(1)
    waves = [0.1 * rng.standard_normal(16000 * (i + 1)).astype(np.float32) for i in range(3)]
    base = model.base
    calls = []
    stock_reorder = type(base)._reorder_cache if hasattr(type(base), "_reorder_cache") else None
    assert stock_reorder is None  # else generate would already use the model's own reorder, and this test is moot

    original = base.generate

    def spy(*args, **kwargs):
        calls.append("_reorder_cache" in vars(base))
        return original(*args, **kwargs)

    base.generate = spy
    try:
        cfg = ASREvalConfig(max_new_tokens=8, num_beams=3, batch_size=3)
        ours, _ = transcribe(model, processor, waves, cfg, precision="fp32", language=None, task=None)
    finally:
        del base.generate
    assert calls and all(calls)  # the self-attention-only reorder was in place for every generate call
    assert "_reorder_cache" not in vars(base)  # and removed afterwards
    model.eval()
    with torch.no_grad():
        out = model.whisper.generate(input_features=log_mel(processor, waves), num_beams=3, max_new_tokens=8,
                                     do_sample=False)
    stock = [t.strip() for t in processor.batch_decode(getattr(out, "sequences", out), skip_special_tokens=True)]
    assert ours == stock
    assert len(set(ours)) > 1  # the clips decode differently: the comparison is not between constant outputs


def test_replay_kl_is_zero_at_the_zero_shot_model_and_pulls_trained_adapters_back(tiny_whisper):
    model, processor, _ = _build(tiny_whisper)
    _, _, batch = _batch(processor, 3)
    model.replay_kl_weight = 1.0
    flags = torch.tensor([True, False, True])
    model.eval()

    def loss(**extra):
        return model(**batch, **extra)["loss"]

    with torch.no_grad():  # fresh LoRA (B = 0) is the zero-shot model: nothing to pull back
        assert loss(replay=flags).item() == pytest.approx(loss().item(), abs=1e-6)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        plain = loss().item()
        assert loss(replay=torch.zeros(3, dtype=torch.bool)).item() == pytest.approx(plain)  # no replay rows
    kl = loss(replay=flags) - loss()
    assert kl.item() > 1e-3
    kl.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # the adapters are switched back on after the zero-shot pass
        assert loss().item() == pytest.approx(plain)
        model.replay_kl_weight = 0.0
        assert loss(replay=flags).item() == pytest.approx(plain)  # weight 0: the flags change nothing


def test_replay_needs_an_adapter_on_the_decoder_and_reads_manifest_flags(tmp_path, speech_manifests):
    from modaltune.audio.data import ClipFilter, read_manifest, validate
    from modaltune.shared.config import load_config
    from modaltune.shared.skips import Skips
    from modaltune.shared.errors import DataError
    from modaltune.shared.recipe import get_recipe

    recipe = get_recipe("domain-asr")
    with pytest.raises(ConfigError, match="replay.kl_weight=0.5 needs an adapter method on the decoder"):
        load_config(recipe.config_cls, recipe.default_config_path(), ["replay.kl_weight=0.5", "decoder.method=full"])
    rows = read_manifest(str(speech_manifests["train"]))
    clips = validate(rows, ClipFilter(), Skips())
    assert [c.replay for c in clips] == [i % 4 == 0 for i in range(12)]
    wav = speech_manifests["train"].parent / "train-0.wav"
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(f"audio,text,replay\n{wav},a,yes\n{wav},b,\n{wav},c,0\n")
    assert [r["replay"] for r in read_manifest(str(csv_path))] == [True, False, False]
    csv_path.write_text(f"audio,text,replay\n{wav},a,maybe\n")
    with pytest.raises(DataError, match=r"m.csv:2: replay: 'maybe' is not a boolean"):
        read_manifest(str(csv_path))


def test_half_fine_tuning_of_the_decoder_runs_and_reports_its_draw(tmp_path, tiny_whisper, speech_manifests):
    from modaltune.shared import checkpoint as ckpt
    from modaltune.shared.cli import main

    out = tmp_path / "hft"
    args = ["run", "domain-asr", "--out", str(out), f"model.name={tiny_whisper}",
            f"data.source={speech_manifests['train']}", f"data.test={speech_manifests['test']}",
            "data.general=null", "data.terms=null", "train.max_steps=2", "train.batch_size=4", "train.save_steps=2",
            "train.precision=fp32", "eval.max_new_tokens=8", "augment.views=1", "augment.speed=[]",
            "decoder.method=hft", "replay.kl_weight=0"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok", report.get("error")
    (stage,) = report["training"]["stages"]
    drawn = stage["half_fine_tuning"]["decoder"]
    assert 0.4 < drawn["block_fraction"] < 0.6  # tiny blocks: whole matrices, so only about half
    assert drawn["matrices_trained_in_blocks"]  # which matrices trained, by name
    saved = ckpt.read_trained(out / "checkpoint")
    assert saved and all(".decoder.layers." in k for k in saved)  # block weights only: no embeddings, no head
    assert report["metrics"]["after"]["test/wer"] is not None


@pytest.mark.parametrize("method", ["lora_fa", "dylora"])
def test_memory_methods_apply_to_a_whisper_component(method, tiny_whisper):
    """LoRA-FA and DyLoRA on the decoder only: A fixed there / the rank controller over the decoder's layers."""
    model, processor, _ = _build(tiny_whisper, "frozen", method)
    lora_layers = [n for n, _ in model.named_modules() if n.endswith("lora_A.default")]
    decoder = [n for n in lora_layers if ".decoder." in n]
    assert decoder and len(decoder) == len(lora_layers)
    if method == "lora_fa":
        assert model.fixed_factors == {f"{n}.weight" for n in decoder}
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    else:
        assert model.peft_state("dylora") is not None and len(model.peft_state("dylora").layers) == len(decoder)
        _, _, batch = _batch(processor)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.5)  # trained-looking: rank 1 then differs from rank 4
            full = model(**batch)["loss"]
            with model.peft_state("dylora").at(1):
                one = model(**batch)["loss"]
        assert torch.isfinite(one) and abs(float(one) - float(full)) > 1e-4
