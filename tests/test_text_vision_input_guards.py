"""Rows of the wrong type are named, counted skips, never trained on as their Python repr (issue 33): instruction
rows, preference pairs, VQA rows and non-finite images."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from modaltune.shared.skips import Skips
from modaltune.text.data import InstructionDataConfig, load_splits
from modaltune.text.preference import PairDataConfig, load_pairs
from modaltune.vision.data import VQAItem, read_pathvqa, read_slake, read_vqa_jsonl, read_vqa_rad, validate_images
from modaltune.vision.images import ImageReadError, load_image

GOOD = {"instruction": "Expand BP.", "response": "blood pressure"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft(tmp_path, bad, **cfg):
    """Load one bad row (line 2) between two good ones; returns (kept responses, skips)."""
    path = _jsonl(tmp_path / "rows.jsonl", [GOOD, bad, GOOD])
    data = load_splits(InstructionDataConfig(source=str(path), split=[1.0, 0.0, 0.0], **cfg))
    return [ex.response for ex in data.examples["train"]], data.skipped["train"]


def _user(content):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, reason", [
    ({"instruction": ["Expand", "BP"], "input": "", "output": "x"}, "instruction: expected a string, got list"),
    ({"instruction": "Expand BP.", "output": {"text": "x"}}, "output: expected a string or a number, got dict"),
    ({"instruction": "Expand BP.", "input": ["BP"], "output": "x"}, "input: expected a string, got list"),
    ({"instruction": 5, "response": "x"}, "instruction: expected a string, got int"),
    ({"instruction": "Expand BP.", "response": True}, "response: expected a string or a number, got bool"),
    ({"instruction": "Expand BP.", "response": float("nan")}, "response: expected a string or a number, got float"),
    ({"instruction": "Expand BP.", "context": {"c": 1}, "response": "x"}, "context: expected a string, got dict"),
    ({"instruction": "Expand BP.", "response": "x", "category": ["a"]},
     "category: expected a string or an integer, got list"),
    ({"prompt": {"text": "p"}, "completion": "x"}, "prompt: expected a string or a list of messages, got dict"),
    ({"prompt": "p", "completion": [7]}, "malformed message (needs role and content)"),
    ({"prompt": "p", "completion": {"a": 1}}, "completion: expected a string, a number or a list of messages, got dict"),
    (_user({"text": "hi"}), "content: expected a string or a list of content parts, got dict"),
    (_user(3), "content: expected a string or a list of content parts, got int"),
    (_user(["hi"]), "content: expected content parts (objects with a type), got str"),
    (_user([{"type": "text", "text": ["hi"]}]), "content: text part: expected a string, got list"),
    ({"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "role: expected a string, got list"),
    ({"conversations": [{"from": "human", "value": {"v": "hi"}}, {"from": "gpt", "value": "x"}]},
     "value: expected a string or a list of content parts, got dict"),
])
def test_a_field_of_the_wrong_type_is_a_named_skip(tmp_path, bad, reason):
    kept, skipped = _sft(tmp_path, bad)
    assert kept == ["blood pressure", "blood pressure"]
    assert dict(skipped) == {reason: 1}
    assert skipped.names[reason] == ["rows.jsonl:2"]


def test_a_numeric_answer_is_read_as_its_text(tmp_path):
    kept, skipped = _sft(tmp_path, {"instruction": "What is 6 x 7?", "output": 42})
    assert sorted(kept) == ["42", "blood pressure", "blood pressure"] and not skipped


def test_the_field_is_named_as_the_data_names_it(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"q": "Expand BP.", "a": "blood pressure"}, {"q": ["a"], "a": "x"}])
    data = load_splits(InstructionDataConfig(source=str(path), split=[1.0, 0.0, 0.0],
                                             columns={"instruction": "q", "response": "a"}))
    assert [ex.response for ex in data.examples["train"]] == ["blood pressure"]
    assert data.skipped["train"].names == {"q: expected a string, got list": ["qa.jsonl:2"]}


def test_openai_text_parts_are_joined_in_order(tmp_path):
    row = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "BP?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blood "}, {"type": "text", "text": "pressure"}]},
    ]}
    path = _jsonl(tmp_path / "m.jsonl", [row])
    (ex,) = load_splits(InstructionDataConfig(source=str(path), split=[1.0, 0.0, 0.0])).examples["train"]
    assert ex.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is BP?"}]
    assert ex.response == "blood pressure"


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_a_non_text_part_in_a_text_only_recipe_is_a_named_skip(tmp_path, part):
    kept, skipped = _sft(tmp_path, _user([{"type": "text", "text": "What is this?"}, part]))
    reason = f"content: part of type {part['type']!r} in a text-only recipe"
    assert kept == ["blood pressure", "blood pressure"]
    assert dict(skipped) == {reason: 1} and skipped.names[reason] == ["rows.jsonl:2"]


def test_pairs_with_an_answer_of_the_wrong_type_are_named_skips(tmp_path):
    rows = [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"},
        {"instruction": "Say hi", "chosen": ["hi"], "rejected": "bye"},  # instruction rows take string answers
        {"prompt": "Say hi", "chosen": "hi", "rejected": {"text": "bye"}},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "failure": ["rude"]},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],  # trl's conversational form
         "chosen": [{"role": "assistant", "content": "hi"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"prompt": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "chosen": [{"role": "assistant", "content": "hi"}], "rejected": [{"role": "assistant", "content": "go"}]},
    ]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    pairs, skipped = load_pairs(PairDataConfig(source=str(path), split=[1.0, 0.0, 0.0]))
    got = sorted((p.example.messages[-1]["content"], p.example.response, p.rejected) for p in pairs["train"])
    assert got == [("Say hi", "hi", "bye"), ("Say hi", "hi", "go")]
    assert skipped["train"].names == {
        "chosen: expected a string or a number, got list": ["p.jsonl:2"],
        "rejected: expected a string, a number or a list of messages, got dict": ["p.jsonl:3"],
        "failure: expected a string, got list": ["p.jsonl:4"],
        "content: part of type 'image_url' in a text-only recipe": ["p.jsonl:6"],
    }


# ---- vision -------------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "good.png")
    (folder / "5.png").write_bytes((folder / "good.png").read_bytes())  # a number must not find it
    return folder


def test_vqa_jsonl_fields_of_the_wrong_type_are_named_skips(tmp_path, images):
    path = _jsonl(tmp_path / "vqa.jsonl", [
        {"image": "images/good.png", "question": "Any effusion?", "answer": "no"},
        {"image": 5, "question": "Any effusion?", "answer": "no"},
        {"image": ["images/good.png"], "question": "Any effusion?", "answer": "no"},
        {"image": "images/good.png", "question": ["Any effusion?"], "answer": "no"},
        {"image": "images/good.png", "question": "Any effusion?", "answer": {"text": "no"}},
        {"image": "images/good.png", "question": "Any effusion?", "answer": True},
        {"image": "images/good.png", "question": "How many ribs?", "answer": 12},  # a count: kept as written
    ])
    items, skipped = read_vqa_jsonl(path)
    assert [(i.id, i.answer) for i in items] == [("1", "no"), ("7", "12")]
    assert skipped.names == {"image: expected a file name, got int": ["2"],
                             "image: expected a file name, got list": ["3"],
                             "question: expected a string, got list": ["4"],
                             "answer: expected a string or a number, got dict": ["5"],
                             "answer: expected a string or a number, got bool": ["6"]}


def test_each_layout_names_its_own_image_field(tmp_path, images):
    row = {"qid": 1, "question": "Q?", "answer": "yes", "answer_type": "CLOSED"}
    rad = tmp_path / "rad.json"
    rad.write_text(json.dumps([{**row, "image_name": 5}]))
    assert dict(read_vqa_rad(rad, images)[1]) == {"image_name: expected a file name, got int": 1}
    slake = tmp_path / "slake.json"
    slake.write_text(json.dumps([{**row, "img_name": {"path": "good.png"}}]))
    assert dict(read_slake(slake, images)[1]) == {"img_name: expected a file name, got dict": 1}
    path = _jsonl(tmp_path / "path.jsonl", [{**row, "image": 5}])
    assert dict(read_pathvqa(path, images)[1]) == {"image: expected a file name, got int": 1}


def _float_tiff(path, bad):
    arr = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    arr[3, 4] = bad
    Image.fromarray(arr, "F").save(path)
    return path


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_non_finite_samples_is_a_counted_skip(images, bad):
    tiff = _float_tiff(images / "float.tif", bad)
    with pytest.raises(ImageReadError, match=r"float\.tif: non-finite samples") as err:
        load_image(tiff)
    assert err.value.reason == "non-finite samples"
    items = [VQAItem("q1", str(tiff), "Q?", "yes", "closed"), VQAItem("q2", str(images / "good.png"), "Q?", "no",
                                                                      "closed")]
    skipped = Skips()
    assert [i.id for i in validate_images(items, skipped)] == ["q2"]
    assert skipped.names == {"non-finite samples": [f"q1 ({tiff})"]}


def test_a_finite_float_tiff_is_still_scaled_from_its_range(images):
    out = np.asarray(load_image(_float_tiff(images / "fine.tif", 0.5)))[..., 0]
    assert out.min() == 0 and out.max() == 255


def test_a_float_dicom_with_nan_is_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    arr = ds.pixel_array.astype(np.float32)
    arr[0, 0] = np.nan
    del ds.PixelData, ds.BitsStored, ds.HighBit
    for tag in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "PixelRepresentation",
                "SmallestImagePixelValue", "LargestImagePixelValue"):
        if tag in ds:
            delattr(ds, tag)
    ds.BitsAllocated = 32
    ds.FloatPixelData = arr.tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "float.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="non-finite samples") as err:
        load_image(tmp_path / "float.dcm")
    assert err.value.reason == "non-finite samples"


def test_the_skip_reason_survives_a_dataloader_worker():
    err = pickle.loads(pickle.dumps(ImageReadError("cannot read image a.tif: ...", reason="non-finite samples")))
    assert (str(err), err.reason) == ("cannot read image a.tif: ...", "non-finite samples")
    assert ImageReadError("x").reason == "unreadable image"
