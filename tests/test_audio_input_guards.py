"""Bad audio input is a named, counted skip (or a clear error), never NaN weights or a traceback (issue 33).

Non-finite samples (float WAVs, ``datasets`` arrays), manifest fields of the wrong type, transcripts longer than the
decoder, and encoder states that are not finite in the feature cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from modaltune.audio.data import Clip, ClipFilter, read_manifest, validate
from modaltune.shared.errors import DataError
from modaltune.shared.skips import Skips

SR = 16000


def _voice(seconds: float = 1.0) -> np.ndarray:
    return (0.2 * np.sin(np.arange(int(seconds * SR)) / 5)).astype(np.float32)


def _manifest(folder, rows: list[dict]) -> str:
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_float_wavs_with_nan_or_inf_samples_are_named_skips(tmp_path):
    import soundfile as sf

    from modaltune.audio.io import AudioReadError, load_audio

    nan, inf = _voice(), _voice()
    nan[100:200] = np.nan
    inf[5000] = -np.inf
    for name, wave in (("ok", _voice()), ("nan", nan), ("inf", inf)):
        sf.write(tmp_path / f"{name}.wav", wave, SR, subtype="FLOAT")
    assert np.isnan(sf.read(tmp_path / "nan.wav", dtype="float32")[0]).sum() == 100  # the file holds them
    rows = [{"audio": "ok.wav", "text": "good"}, {"audio": "nan.wav", "text": "bad"},
            {"audio": "inf.wav", "text": "bad"}, {"audio": "ok.wav", "text": "good again"}]
    skipped = Skips()
    clips = validate(read_manifest(_manifest(tmp_path, rows)), ClipFilter(), skipped)
    assert [c.text for c in clips] == ["good", "good again"]
    assert skipped == {"non-finite samples": 2}
    assert skipped.names == {"non-finite samples": ["m.jsonl:2", "m.jsonl:3"]}
    with pytest.raises(AudioReadError, match=r"nan\.wav: 100 of 16,000 samples are NaN or infinite") as err:
        load_audio(tmp_path / "nan.wav")
    assert err.value.reason == "non-finite samples"


def test_decoded_dataset_arrays_are_checked_like_files(monkeypatch):
    import modaltune.audio.data as data

    huge = np.full(SR, 1e300)  # finite as float64, infinite once the reader makes it float32
    nan = _voice()
    nan[7] = np.nan
    rows = [{"audio": {"array": _voice(), "sampling_rate": SR}, "text": "fine", "speaker": 7},
            {"audio": {"array": nan, "sampling_rate": SR}, "text": "nan"},
            {"audio": {"array": huge, "sampling_rate": SR}, "text": "huge"},
            {"audio": {"array": _voice(), "sampling_rate": SR}, "text": ["a", "list"]}]
    monkeypatch.setattr(data, "read_hf_rows", lambda name, split, prepare: [(f"{name}[{i}]", r)
                                                                          for i, r in enumerate(rows)])
    skipped = Skips()
    clips = validate(read_manifest("hf:toy"), ClipFilter(), skipped)
    assert [(c.text, c.speaker) for c in clips] == [("fine", "7")]  # an integer speaker column is an id column
    assert skipped == {"non-finite samples": 2, "text: expected a string, got list": 1}
    assert skipped.names["non-finite samples"] == ["toy[1]", "toy[2]"]


def test_wrongly_typed_manifest_fields_are_named_skips_and_never_stringified(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "ok.wav", _voice(), SR)
    sf.write(tmp_path / "long.wav", _voice(31), SR)
    good = {"audio": "ok.wav", "text": "fine", "speaker": "s1"}
    rows = [
        good,                                                             # 1
        {"audio": 12345, "text": "x"},                                    # 2
        {"audio": {"a": 1}, "text": "x"},                                 # 3
        {"audio": "ok.wav", "text": ["a"]},                               # 4
        {"audio": "ok.wav", "text": {"x": 1}},                            # 5
        {"audio": "ok.wav", "text": "x", "speaker": 5},                   # 6
        {"audio": "ok.wav", "text": True},                                # 7
        {"audio": "ok.wav", "text": "x", "segments": "0-1 s"},            # 8
        {"audio": "ok.wav", "text": "x", "segments": [{"start": 0, "end": "1", "text": "x"}]},  # 9
        {"audio": "ok.wav", "text": "x", "slots": "drug=aspirin"},        # 10
        {"audio": "ok.wav", "text": "x", "slots": {"drug": ["aspirin"]}},  # 11
        {"audio": "ok.wav", "text": "x", "answer": True},                 # 12
        {"audio": "ok.wav", "text": "x", "task": {"name": "qa"}},         # 13
        {"audio": "ok.wav", "text": "x", "id": {"a": 1}},                 # 14
        {"audio": "ok.wav", "text": "typed", "id": 7, "slots": {"drug": "aspirin", "dose": None},
         "task": "qa", "prompt": "How many?", "answer": 3},               # 15: a number is a fine answer
        {"audio": "long.wav", "text": "split", "segments": [{"start": 0, "end": 12.5, "text": "part one"},
                                                           {"start": 12.5, "end": 31, "text": "part two"}]},  # 16
    ]
    skipped = Skips()
    clips = validate(read_manifest(_manifest(tmp_path, rows)), ClipFilter(long_clips="split"), skipped)
    assert [(c.id, c.text, c.speaker) for c in clips] == [
        ("m.jsonl:1", "fine", "s1"), ("7", "typed", ""), ("m.jsonl:16#0", "part one", ""),
        ("m.jsonl:16#1", "part two", "")]
    assert clips[1].meta == {"task": "qa", "prompt": "How many?", "answer": 3,
                             "slots": {"drug": "aspirin", "dose": None}}
    segments = "segments: expected a list of objects with numeric start/end and string text"
    assert skipped.names == {
        "audio: expected a path, got int": ["m.jsonl:2"],
        "audio: expected a path, got dict": ["m.jsonl:3"],
        "text: expected a string, got list": ["m.jsonl:4"],
        "text: expected a string, got dict": ["m.jsonl:5"],
        "speaker: expected a string, got int": ["m.jsonl:6"],
        "text: expected a string, got bool": ["m.jsonl:7"],
        segments: ["m.jsonl:8: got str", "m.jsonl:9: segments[0].end is a str"],
        "slots: expected an object, got str": ["m.jsonl:10"],
        "slots: expected string values": ["m.jsonl:11: slots.drug is a list"],
        "answer: expected a string or a number, got bool": ["m.jsonl:12"],
        "task: expected a string, got dict": ["m.jsonl:13"],
        "id: expected a string or an integer, got dict": ["m.jsonl:14"],
    }
    assert sum(skipped.values()) == 13 and skipped[segments] == 2
    from modaltune.audio.tasks import AudioTasksConfig, task_rows

    made = {r["task"]: r["target"] for r in task_rows([clips[1]], AudioTasksConfig(), train=False)}
    assert made == {"transcribe": "typed", "orders": '{"drug": "aspirin"}', "qa": "3"}
    mapped = [{"file": "ok.wav", "sentence": ["a", "list"]}, {"file": "ok.wav", "sentence": "kept"}]
    skipped = Skips()
    clips = validate(read_manifest(_manifest(tmp_path, mapped), columns={"audio": "file", "text": "sentence"}),
                     ClipFilter(), skipped)
    assert [c.text for c in clips] == ["kept"]  # a mapped field is named as the data names it
    assert skipped.names == {"sentence: expected a string, got list": ["m.jsonl:1"]}
    csv_path = tmp_path / "m.csv"  # a CSV gives strings only: a numeric speaker there is just its text
    csv_path.write_text(f"audio,text,speaker\n{tmp_path / 'ok.wav'},fine,5\n")
    skipped = Skips()
    assert [c.speaker for c in validate(read_manifest(str(csv_path)), ClipFilter(), skipped)] == ["5"]
    assert not skipped


def _whisper(folder):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from modaltune.audio.whisper import WhisperASR

    hf = WhisperForConditionalGeneration.from_pretrained(str(folder))
    processor = WhisperProcessor.from_pretrained(str(folder))
    model = WhisperASR(hf, pad_token_id=processor.tokenizer.pad_token_id,
                       decoder_start_token_id=hf.config.decoder_start_token_id)
    model.feature_extractor = processor.feature_extractor
    return model.eval(), processor


def test_transcripts_over_the_decoder_length_are_counted_skips(tiny_whisper, tmp_path):
    from modaltune.audio.asr import asr_train_set
    from modaltune.audio.features import ASRCollator
    from modaltune.audio.whisper import label_ids

    model, processor = _whisper(tiny_whisper)
    limit = model.config.max_target_positions  # 64 in the tiny model, 448 in real Whisper
    fits = ""
    while len(label_ids(processor, fits + " a")) <= limit:  # " a" is one token in the tiny vocabulary
        fits += " a"
    assert len(label_ids(processor, fits)) == limit
    over = fits + " a"
    n_over = len(label_ids(processor, over))
    assert n_over > limit
    huge = "x" * 200_000
    clips = [Clip("ok", _voice(), "fine"), Clip("at-limit", _voice(), fits), Clip("one-over", _voice(), over),
             Clip("huge", _voice(), huge)]
    counts = {**Skips().summary(len(clips)), "audio_minutes": 0.07}
    ds = asr_train_set(clips, processor, augment=None, cache=None, max_label_tokens=limit, counts=counts)
    assert len(ds) == 2 and [len(x) for x in ds.labels] == [len(label_ids(processor, "fine")), limit]
    reason = f"text: over the model's {limit} label tokens"
    assert counts["kept"] == 2 and counts["skipped"] == 2 and counts["skip_reasons"] == {reason: 2}
    n_huge = len(label_ids(processor, huge))
    assert counts["skipped_items"][reason] == [f"one-over: {n_over} tokens", f"huge: {n_huge:,} tokens"]
    assert counts["audio_minutes"] == round(2 * 1.0 / 60, 2)
    with torch.no_grad():  # the kept labels fit the decoder; one more token has no position
        assert torch.isfinite(model(**ASRCollator()([ds[1]]))["loss"])
        with pytest.raises(IndexError):
            model(**ASRCollator()([{**ds[1], "labels": label_ids(processor, over)}]))
    with pytest.raises(DataError, match=rf"one-over: text: over the model's {limit} label tokens"):
        asr_train_set(clips, processor, augment=None, cache=None, max_label_tokens=limit)


class _Overflowing(nn.Module):
    """A one-block cached encoder whose states overflow to infinity for inputs with huge values."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        nn.init.ones_(self.block.weight)
        nn.init.zeros_(self.block.bias)
        self.out_dim, self.preprocessing_key, self.output_depth = 4, "toy", 1

    def preprocess(self, inputs):
        return torch.stack([torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in inputs])  # (B, 3, 4)

    def cache_depth(self):
        return 1

    def cached_weights(self, depth):
        return list(self.named_parameters())

    def encode_prefix(self, x, depth):
        return self.block(x) * 1e38  # (B, 3, 4)

    def encode_rest(self, states, depth):
        return states


def test_feature_cache_refuses_non_finite_states_and_names_the_input(tmp_path):
    from safetensors.torch import save_file

    from modaltune.shared.features import FeatureCache

    ok = np.zeros((3, 4), dtype=np.float32)
    bad = np.ones((3, 4), dtype=np.float32)  # 4e38 after the block: over float32's 3.4e38
    cache = FeatureCache(_Overflowing())
    with pytest.raises(DataError, match=r"states for input 1 of 2 \(content key \w+\) hold NaN or infinite"):
        cache.fill([ok, bad])
    assert list(cache.states) == [cache.key(ok)]  # nothing cached for the bad input
    with pytest.raises(DataError, match="states for 'clip-9' hold NaN"):
        cache.fill([ok, bad], names=["clip-8", "clip-9"])
    named = FeatureCache(_Overflowing(), load={"a": ok, "b": bad}.get)
    with pytest.raises(DataError, match="states for 'b' hold NaN"):
        named.fill(["a", "b"])
    disk = FeatureCache(_Overflowing(), directory=tmp_path)
    key = disk.key(ok)
    disk.directory.mkdir(parents=True)
    save_file({"states": torch.full((3, 4), float("nan"))}, str(disk.directory / f"{key}.safetensors"))
    disk.fill([ok])  # a damaged stored file is encoded again, not loaded
    assert disk.loaded == 0 and disk.computed == 1 and torch.isfinite(disk.states[key]).all()
    again = FeatureCache(_Overflowing(), directory=tmp_path)
    again.fill([ok])
    assert again.loaded == 1 and torch.isfinite(again.states[key]).all()
