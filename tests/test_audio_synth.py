"""Synthetic espeak-ng dictation: disjoint templates and voices, a tiny real build, idempotence, clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from modaltune.audio import synth
from modaltune.shared.errors import ModaltuneError



@pytest.fixture
def espeak(system_package):
    """espeak-ng on PATH: under CI its absence fails the test, locally it skips with the package to install."""
    system_package(shutil.which("espeak-ng") is not None, "espeak-ng", "speaking the dictation set")


needs_espeak = pytest.mark.usefixtures("espeak")


def _word_runs(template: str) -> list[list[str]]:
    """The literal words of a template, split into runs at each slot."""
    return [re.findall(r"[a-z']+", part) for part in re.split(r"\{\w+\}", template.lower())]


def _skeleton(template: str) -> str:
    return " ".join(w for run in _word_runs(template) for w in run)


def _trigrams(template: str) -> set[tuple[str, ...]]:
    return {tuple(run[i:i + 3]) for run in _word_runs(template) for i in range(len(run) - 2)}


def test_terms_are_lowercase_unique_and_plentiful():
    terms = synth.load_terms()
    assert len(terms["drugs"]) >= 50 and len(terms["conditions"]) >= 40 and len(terms["procedures"]) >= 30
    flat = synth.all_terms()
    assert len(flat) == len(set(flat)) == sum(len(v) for v in terms.values())
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", t) for t in flat), [t for t in flat if not t.islower()]


def test_test_templates_share_no_phrasing_with_train():
    templates = synth.load_templates()
    train, test = templates["train"], templates["test"]
    assert len(train) >= 30 and len(test) >= 10
    train_skeletons = {_skeleton(t) for t in train}
    train_trigrams = set().union(*(_trigrams(t) for t in train))
    for template in test:
        assert _skeleton(template) not in train_skeletons, template
        assert not _trigrams(template) & train_trigrams, (template, _trigrams(template) & train_trigrams)
    slot = re.compile(r"\{(\w+)\}")
    for template in train + test:
        assert set(slot.findall(template)) <= {"drug", "drug2", "condition", "procedure", "dose", "frequency"}
        assert not re.search(r"\d", slot.sub("", template)), template  # words only, no digits
        assert 5 <= len(template.split()) <= 20, template


def test_voices_are_disjoint_in_base_voice_and_variant():
    train, test = synth.DEFAULT_TRAIN_VOICES, synth.DEFAULT_TEST_VOICES
    assert not set(train) & set(test)
    assert not {v.split("+")[0] for v in train} & {v.split("+")[0] for v in test}
    assert not {v.split("+")[1] for v in train} & {v.split("+")[1] for v in test}


def test_sentence_plan_is_deterministic_and_uses_the_split_templates():
    kwargs = dict(seed=3, voices=synth.DEFAULT_TEST_VOICES, speeds=(150,), pitches=(40, 60))
    a = synth.plan_sentences("test", 30, **kwargs)
    assert a == synth.plan_sentences("test", 30, **kwargs)
    assert a != synth.plan_sentences("test", 30, **{**kwargs, "seed": 4})
    n_templates = len(synth.load_templates()["test"])
    assert {job.template for job in a} == {f"test-{i:02d}" for i in range(n_templates)}  # round-robin coverage
    assert all("{" not in job.text and job.voice in synth.DEFAULT_TEST_VOICES for job in a)
    assert all(job.lead_in == job.tail == 0.0 for job in a)  # no silence unless asked
    quiet = synth.plan_sentences("test", 30, **kwargs, silence=(0.2, 0.8))
    assert [(j.text, j.voice, j.speed, j.pitch) for j in quiet] == [(j.text, j.voice, j.speed, j.pitch) for j in a]
    pauses = [x for j in quiet for x in (j.lead_in, j.tail)]
    assert all(0.2 <= x <= 0.8 for x in pauses) and len(set(pauses)) > 10


def test_general_sentences_share_no_phrasing_with_the_test_templates_or_librivox():
    sentences = synth.load_general_sentences()
    assert len(sentences) >= 100 and len(set(s.lower() for s in sentences)) == len(sentences)
    test_trigrams = set().union(*(_trigrams(t) for t in synth.load_templates()["test"]))
    terms = synth.all_terms()
    for sentence in sentences:
        assert "{" not in sentence and not re.search(r"\d", sentence), sentence
        assert not _trigrams(sentence) & test_trigrams, (sentence, _trigrams(sentence) & test_trigrams)
        assert not [t for t in terms if re.search(rf"\b{t}\b", sentence.lower())], sentence  # general, not medical
    from modaltune.audio.data import builtin_general_set

    librivox = [" ".join(re.findall(r"[a-z']+", row["text"].lower())) for row in builtin_general_set()]
    for sentence in sentences:  # the general-speech check set is never trained on
        words = re.findall(r"[a-z']+", sentence.lower())
        quads = {" ".join(words[i:i + 4]) for i in range(len(words) - 3)}
        assert not [q for q in quads for ref in librivox if f" {q} " in f" {ref} "], sentence


def test_general_plan_is_deterministic_training_voiced_and_covers_the_sentences():
    kwargs = dict(seed=0, voices=synth.DEFAULT_TRAIN_VOICES, speeds=(165,), pitches=(50,), silence=(0.2, 0.8))
    jobs = synth.plan_general(40, **kwargs)
    assert jobs == synth.plan_general(40, **kwargs) and jobs != synth.plan_general(40, **{**kwargs, "seed": 1})
    assert [j.id for j in jobs] == [f"general-{i:04d}" for i in range(40)]
    assert all(j.split == "train" and j.voice in synth.DEFAULT_TRAIN_VOICES for j in jobs)
    assert len({j.text for j in jobs}) == 40  # shuffled rounds: no sentence twice before all were used
    assert set(j.text for j in jobs) <= set(synth.load_general_sentences())


@needs_espeak
def test_default_voices_exist_in_installed_espeak():
    synth.check_voices(list(synth.DEFAULT_TRAIN_VOICES) + list(synth.DEFAULT_TEST_VOICES))
    with pytest.raises(ModaltuneError, match="no voice 'en-xx'"):
        synth.check_voices(["en-xx+m3"])


@needs_espeak
def test_tiny_build_is_valid_and_idempotent(tmp_path):
    out = tmp_path / "dictation"
    manifests = synth.build_dictation_set(out, n_train=4, n_test=2, workers=1, progress=False)
    assert manifests == {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    assert not [p for p in tmp_path.iterdir() if p.name != "dictation"]  # no temp folder left behind
    for split, n in (("train", 4), ("test", 2)):
        rows = [json.loads(line) for line in manifests[split].read_text().splitlines()]
        assert len(rows) == n
        voices = synth.DEFAULT_TRAIN_VOICES if split == "train" else synth.DEFAULT_TEST_VOICES
        for row in rows:
            assert set(row) - {"slots"} == {"id", "audio", "text", "speaker", "duration", "template"}
            for slot, value in row.get("slots", {}).items():  # the template's fill-ins, spoken in the sentence
                assert slot in {"drug", "drug2", "condition", "procedure", "dose", "frequency"}
                assert value.lower() in row["text"].lower(), (slot, value, row["text"])
            assert row["speaker"] in voices and row["template"].startswith(f"{split}-")
            wav = out / row["audio"]
            assert wav.is_file() and Path(row["audio"]).parts[:2] == ("wav", split)
            info = sf.info(str(wav))
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert abs(info.frames / 16000 - row["duration"]) < 1e-3
            assert 1.0 < row["duration"] < 30.0
            audio, _ = sf.read(str(wav), dtype="float32")
            assert np.abs(audio).max() > 0.05  # speech, not silence
            lead = int(np.argmax(np.abs(audio) > 0))
            trail = int(np.argmax(np.abs(audio[::-1]) > 0))
            assert 0.2 * 16000 <= lead <= 0.82 * 16000 and 0.2 * 16000 <= trail  # a recording's lead-in and tail
    build = json.loads((out / "BUILD.json").read_text())
    assert build["counts"] == {"train": 4, "test": 2} and build["params"]["n_train"] == 4

    stamp = (out / "BUILD.json").stat().st_mtime_ns
    wav_stamp = (out / "wav" / "train" / "train-0000.wav").stat().st_mtime_ns
    assert synth.build_dictation_set(out, n_train=4, n_test=2, workers=1, progress=False) == manifests
    assert (out / "BUILD.json").stat().st_mtime_ns == stamp
    assert (out / "wav" / "train" / "train-0000.wav").stat().st_mtime_ns == wav_stamp

    synth.build_dictation_set(out, n_train=3, n_test=1, workers=1, progress=False)  # new parameters: rebuilt
    assert len(manifests["train"].read_text().splitlines()) == 3
    assert sorted(p.name for p in (out / "wav" / "train").iterdir()) == [f"train-000{i}.wav" for i in range(3)]

    synth.build_dictation_set(out, n_train=2, n_test=1, n_general=2, workers=1, progress=False)
    rows = [json.loads(line) for line in manifests["train"].read_text().splitlines()]
    assert [r["id"] for r in rows] == ["train-0000", "train-0001", "general-0000", "general-0001"]
    general = set(synth.load_general_sentences())
    assert all(r["text"] in general and r["template"].startswith("general-") for r in rows[2:])
    assert [r.get("replay", False) for r in rows] == [False, False, True, True]  # replay rows are marked as such
    assert all(r["speaker"] in synth.DEFAULT_TRAIN_VOICES and (out / r["audio"]).is_file() for r in rows)


@needs_espeak
def test_build_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModaltuneError, match="not a dictation build"):
        synth.build_dictation_set(tmp_path, n_train=1, n_test=1, workers=1, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overlapping_voices_are_rejected(tmp_path):
    with pytest.raises(ModaltuneError, match="in both splits"):
        synth.build_dictation_set(tmp_path / "d", train_voices=["en-us+m3"], test_voices=["en-us+m3"])
    with pytest.raises(ModaltuneError, match="n_general=-1"):
        synth.build_dictation_set(tmp_path / "d", n_general=-1)
    with pytest.raises(ModaltuneError, match=r"silence=\[0.5, 0.2\]"):
        synth.build_dictation_set(tmp_path / "d", silence=(0.5, 0.2))


def test_missing_espeak_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no espeak-ng on PATH
    with pytest.raises(ModaltuneError, match=r"espeak-ng is not installed: apt-get install espeak-ng"):
        synth.speak("hello", "en-us", path=tmp_path / "x.wav")
    with pytest.raises(ModaltuneError, match=r"espeak-ng is not installed"):
        synth.build_dictation_set(tmp_path / "d", n_train=1, n_test=1, progress=False)
    assert not (tmp_path / "d").exists()


def test_default_training_plan_uses_every_term_and_test_terms_are_seen_in_training():
    train = " ".join(job.text.lower() for job in synth.plan_sentences(
        "train", 240, seed=0, voices=synth.DEFAULT_TRAIN_VOICES, speeds=(165,), pitches=(50,)))
    test = " ".join(job.text.lower() for job in synth.plan_sentences(
        "test", 60, seed=0, voices=synth.DEFAULT_TEST_VOICES, speeds=(165,), pitches=(50,)))
    assert [t for t in synth.all_terms() if t not in train] == []
    assert sum(t in test for t in synth.all_terms()) >= 60
