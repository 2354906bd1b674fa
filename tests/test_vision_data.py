"""Image loading (rasters of every mode, DICOM) and the Med-VQA / caption data loaders."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from modaltune.shared.errors import DataError, ModaltuneError
from modaltune.vision import data as vdata
from modaltune.vision.data import (
    CAPTION_INSTRUCTIONS,
    CAPTION_TEMPLATE,
    PLACEHOLDER,
    VQA_TEMPLATE,
    CaptionItem,
    VQAItem,
    closed_type,
    easy_vqa_answers,
    easy_vqa_captions,
    read_easy_vqa,
    read_pathvqa,
    read_roco_captions,
    read_slake,
    read_vqa_jsonl,
    read_vqa_rad,
    validate_images,
)
from modaltune.vision.images import ImageReadError, load_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom notes about its test files


def _pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    arr = np.asarray(im)
    assert arr.dtype == np.uint8
    return arr.astype(int)


# ---- rasters ------------------------------------------------------------------------------------------------------


def test_png_modes_become_rgb(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, 30
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    assert (_pixels(load_image(tmp_path / "rgb.png")) == rgb).all()

    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    out = _pixels(load_image(tmp_path / "l.png"))
    assert out.shape == (6, 8, 3) and (out == grey[..., None]).all()

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 1] = 200  # green everywhere, alpha 255 / 0 / 128 across the row
    rgba[..., 3] = [255, 0, 128]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _pixels(load_image(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [0, 200, 0]  # opaque: unchanged
    assert out[0, 1].tolist() == [0, 0, 0]  # transparent: black background
    assert abs(out[0, 2, 1] - 100) <= 1 and out[0, 2, 0] == 0  # half-transparent: half as bright

    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 20, 250] + [0] * 762)
    pal.putpixel((1, 2), 1)
    pal.save(tmp_path / "p.png")
    out = _pixels(load_image(tmp_path / "p.png"))
    assert out[2, 1].tolist() == [10, 20, 250] and out[0, 0].tolist() == [0, 0, 0]


def test_16_bit_png_is_scaled_from_its_own_range(tmp_path):
    deep = np.full((5, 7), 1000, np.uint16)
    deep[0, 0], deep[4, 6], deep[2, 3] = 3000, 1000, 2000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")
    out = _pixels(load_image(tmp_path / "deep.png"))[..., 0]
    assert out[0, 0] == 255 and out[4, 6] == 0 and abs(out[2, 3] - 128) <= 1

    Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(tmp_path / "flat.png")
    assert (_pixels(load_image(tmp_path / "flat.png")) == 0).all()


def test_jpeg_corrupt_and_missing(tmp_path):
    Image.new("RGB", (16, 12), (250, 10, 10)).save(tmp_path / "red.jpg", quality=95)
    out = _pixels(load_image(tmp_path / "red.jpg"))
    assert out.shape == (12, 16, 3) and abs(out[..., 0].mean() - 250) < 6 and out[..., 1].mean() < 15

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match=r"bad\.png") as err:
        load_image(tmp_path / "bad.png")
    assert "\n" not in str(err.value) and isinstance(err.value, ModaltuneError)
    with pytest.raises(ImageReadError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open file descriptors through /proc")
def test_files_are_closed_after_loading(tmp_path):
    Image.new("L", (8, 8), 7).save(tmp_path / "a.png")
    before = len(os.listdir("/proc/self/fd"))
    images = [load_image(tmp_path / "a.png") for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) <= before
    assert images[-1].getpixel((0, 0)) == (7, 7, 7)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    for side in (8, 12, 30):
        Image.new("RGB", (side, side)).save(tmp_path / f"{side}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(tmp_path / "8.png").size == (8, 8)  # 64 pixels: under the limit
    for side in (12, 30):  # 144 pixels: Pillow's warning; 900 (over twice the limit): Pillow's error
        with pytest.raises(ImageReadError, match="MAX_IMAGE_PIXELS"):
            load_image(tmp_path / f"{side}.png")


# ---- DICOM --------------------------------------------------------------------------------------------------------


def test_dicom_ct_without_window_is_min_max_scaled():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds
    hu = apply_modality_lut(ds.pixel_array, ds).astype(float)
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255)
    out = _pixels(load_image(path))
    assert out.shape == (128, 128, 3)
    assert (out[..., 0] == expected).all() and (out[..., 0] == out[..., 2]).all()


def test_dicom_mr_window_matches_pydicom_voi():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)  # signed 16-bit output range
    expected = (windowed + 32768) / 65535 * 255
    out = _pixels(load_image(path))
    assert out.shape == (64, 64, 3)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert (out[..., 0] == 255).any()  # the window clips: it is not a plain min-max
    assert out[..., 0].min() > 0


def test_dicom_modality_lut_comes_before_the_window(tmp_path):
    mr = get_testdata_file("MR_small.dcm")
    plain = _pixels(load_image(mr))
    ds = pydicom.dcmread(mr)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100  # modality values 2x - 100 ...
    ds.WindowCenter, ds.WindowWidth = 2 * 600 - 100, 2 * 1600  # ... and the same window in those units
    ds.save_as(tmp_path / "rescaled.dcm")
    assert np.abs(_pixels(load_image(tmp_path / "rescaled.dcm")) - plain).max() <= 1
    ds.WindowCenter, ds.WindowWidth = [300, 50], [800, 10]  # several windows: the first one is used
    ds.save_as(tmp_path / "multi.dcm")
    rescaled = ds.pixel_array * 2.0 - 100
    expected = np.clip(((rescaled - 299.5) / 799 + 0.5) * 255, 0, 255)
    assert np.abs(_pixels(load_image(tmp_path / "multi.dcm"))[..., 0] - expected).max() <= 0.5 + 1e-6


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    """A VOI LUT (a table, not a window) decides the display values when the file has one."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    first, entries = 0, 4096
    table = (np.arange(entries)[::-1] ** 2 // 4096).astype(np.uint16)  # reversing, non-linear, 12-bit output
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 12])  # LUT Descriptor
    item.add_new(0x00283006, "US", table.tolist())  # LUT Data
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    raw = ds.pixel_array.astype(int)
    expected = table[np.clip(raw - first, 0, entries - 1)].astype(float) * 255 / 4095
    out = _pixels(load_image(tmp_path / "lut.dcm"))[..., 0]
    assert np.abs(out - expected).max() <= 1
    assert not np.array_equal(out, _pixels(load_image(get_testdata_file("MR_small.dcm")))[..., 0])


def test_dicom_monochrome1_multiframe_colour_and_detection(tmp_path):
    mr = get_testdata_file("MR_small.dcm")
    normal = _pixels(load_image(mr))
    ds = pydicom.dcmread(mr)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    assert (_pixels(load_image(tmp_path / "inverted.dcm")) == 255 - normal).all()

    shutil.copy(mr, tmp_path / "scan.img")  # no .dcm suffix: recognised by the DICM marker
    assert (_pixels(load_image(tmp_path / "scan.img")) == normal).all()

    dose = get_testdata_file("rtdose.dcm")  # 15 frames of 10 x 10
    frames = pydicom.dcmread(dose).pixel_array.astype(float)
    scaled = [(f - f.min()) / (f.max() - f.min()) * 255 for f in frames]
    out = _pixels(load_image(dose))
    assert out.shape == (10, 10, 3)
    assert np.abs(out[..., 0] - scaled[7]).max() <= 0.5 + 1e-6  # the middle frame, min-max scaled
    assert np.abs(out[..., 0] - scaled[0]).max() > 3 and np.abs(out[..., 0] - scaled[14]).max() > 3

    rgb = _pixels(load_image(get_testdata_file("SC_rgb_rle.dcm")))
    ybr = _pixels(load_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm")))
    assert rgb.shape == ybr.shape == (100, 100, 3)
    assert np.abs(rgb - ybr).mean() < 2  # the YBR file converted to RGB matches the RGB original
    assert rgb.std(axis=2).mean() > 20  # really coloured

    with pytest.raises(ImageReadError, match="no pixel data"):
        load_image(get_testdata_file("rtplan.dcm"))


# ---- data layouts -------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    (folder / "xmlab1").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "good.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "xmlab1" / "source.jpg")
    (folder / "broken.jpg").write_bytes(b"no jpeg here")
    return folder


def _json(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_closed_type():
    assert closed_type("Yes") == "closed" and closed_type(" no. ") == "closed"
    assert closed_type("2 cm") == "open"
    assert closed_type("yes", "OPEN") == "open"
    assert closed_type("left lung", " closed ") == "closed"
    assert closed_type("no", "CLOSED/OPEN") == "closed"  # unknown layout type: falls back to the answer


def test_vqa_rad(tmp_path, images):
    path = _json(tmp_path / "rad.json", [
        {"qid": 7, "image_name": "good.png", "question": "Is there a fracture?", "answer": "Yes",
         "answer_type": "CLOSED"},
        {"image_name": "good.png", "question": "How many ribs?", "answer": 12, "answer_type": "OPEN "},
        {"qid": 9, "image_name": "absent.png", "question": "Q?", "answer": "no", "answer_type": "CLOSED"},
        {"qid": 10, "image_name": "good.png", "question": "  ", "answer": "no", "answer_type": "CLOSED"},
        {"qid": 11, "image_name": "good.png", "question": "Q?", "answer": None, "answer_type": "OPEN"},
        "not an object",
    ])
    items, skipped = read_vqa_rad(path, images)
    assert items == [
        VQAItem("7", str(images / "good.png"), "Is there a fracture?", "Yes", "closed"),
        VQAItem("1", str(images / "good.png"), "How many ribs?", "12", "open"),  # no qid: the row index
    ]
    assert skipped == Counter({"missing image": 1, "empty question": 1, "empty answer": 1, "malformed row": 1})

    with pytest.raises(DataError, match=r"missing\.json does not exist"):
        read_vqa_rad(tmp_path / "missing.json", images)
    with pytest.raises(DataError, match=r"rad2\.json: expected a JSON list"):
        read_vqa_rad(_json(tmp_path / "rad2.json", {"rows": []}), images)
    (tmp_path / "rad3.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match=r"rad3\.json: invalid JSON"):
        read_vqa_rad(tmp_path / "rad3.json", images)


def test_slake(tmp_path, images):
    base = {"img_name": "xmlab1/source.jpg", "answer_type": "OPEN", "q_lang": "en"}
    path = _json(tmp_path / "slake.json", [
        {**base, "qid": 1, "question": "Which organ is abnormal?", "answer": "Liver"},
        {**base, "qid": 2, "question": "哪个器官不正常?", "answer": "肝", "q_lang": "zh"},
        {**base, "qid": 3, "question": "", "answer": "Liver"},
        {**base, "qid": 4, "question": "Q?", "answer": ""},
        {**base, "qid": 5, "question": "Q?", "answer": "Yes", "img_name": "xmlab2/source.jpg"},
    ])
    items, skipped = read_slake(path, images)
    assert items == [VQAItem("1", str(images / "xmlab1" / "source.jpg"), "Which organ is abnormal?", "Liver", "open")]
    assert skipped == Counter({"not English": 1, "empty question": 1, "empty answer": 1, "missing image": 1})
    with pytest.raises(DataError, match="is not a folder"):
        read_slake(path, tmp_path / "no-images")


def test_pathvqa_json_and_jsonl(tmp_path, images):
    rows = [
        {"image": "good", "question": "Is this benign?", "answer": "no"},  # extension added
        {"id": "p2", "image": "good.png", "question": "What stain is used?", "answer": "H&E"},
        {"image": "other", "question": "Q?", "answer": "yes"},
        {"image": "good", "question": "Q?", "answer": " "},
    ]
    for name, writer in (("p.json", _json), ("p.jsonl", _jsonl)):
        items, skipped = read_pathvqa(writer(tmp_path / name, rows), images)
        assert [(i.image, i.answer_type) for i in items] == [(str(images / "good.png"), "closed"),
                                                             (str(images / "good.png"), "open")]
        assert items[1].id == "p2"
        assert items[0].id == ("0" if name == "p.json" else "1")  # row index / line number
        assert skipped == Counter({"missing image": 1, "empty answer": 1})
    _jsonl(tmp_path / "bad.jsonl", [rows[0], "{oops"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_pathvqa(tmp_path / "bad.jsonl", images)


def test_generic_vqa_jsonl(tmp_path, images):
    path = _jsonl(tmp_path / "vqa.jsonl", [
        {"image": "images/good.png", "question": "Where is the lesion?", "answer": "left", "type": "closed"},
        "",
        {"id": 42, "image": str(images / "good.png"), "question": "Any effusion?", "answer": "No"},
        [1, 2],
        {"image": "images/gone.png", "question": "Q?", "answer": "yes"},
        {"question": "Q?", "answer": "yes"},
    ])
    items, skipped = read_vqa_jsonl(path)
    assert items == [
        VQAItem("1", str(tmp_path / "images" / "good.png"), "Where is the lesion?", "left", "closed"),
        VQAItem("42", str(images / "good.png"), "Any effusion?", "No", "closed"),
    ]
    assert skipped == Counter({"missing image": 2, "malformed row": 1})

    items, skipped = read_vqa_jsonl(path, image_root=images)  # relative paths now resolve under images/
    assert [i.id for i in items] == ["42"] and skipped["missing image"] == 3

    _jsonl(tmp_path / "broken.jsonl", [{"image": "a", "question": "q", "answer": "a"}, "{}", "not json"])
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        read_vqa_jsonl(tmp_path / "broken.jsonl")


def test_roco_captions_tsv_and_csv(tmp_path, images):
    tsv = tmp_path / "captions.txt"
    tsv.write_text("id\tcaption\ngood\t Chest X-ray showing a small effusion. \nno tab here\n"
                   "good\t\nabsent\tAn image that is not there.\n", encoding="utf-8")
    items, skipped = read_roco_captions(images, tsv)
    assert items == [CaptionItem("good", str(images / "good.png"), "Chest X-ray showing a small effusion.")]
    assert skipped == Counter({"malformed row": 1, "empty caption": 1, "missing image": 1})

    csv_path = tmp_path / "captions.csv"
    csv_path.write_text('ID,Caption\ngood.png,"CT, axial view."\nxmlab1/source.jpg,MRI of the brain.\n'
                        "absent,Nothing.\n", encoding="utf-8")
    items, skipped = read_roco_captions(images, csv_path)
    assert [(i.id, i.caption) for i in items] == [("good.png", "CT, axial view."),
                                                  ("xmlab1/source.jpg", "MRI of the brain.")]
    assert skipped == Counter({"missing image": 1})

    (tmp_path / "wrong.csv").write_text("file,text\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"wrong\.csv: a caption CSV needs an id"):
        read_roco_captions(images, tmp_path / "wrong.csv")


def test_validate_images_checks_each_image_once(images, monkeypatch):
    calls = Counter()

    def counting_load(path):
        calls[str(path)] += 1
        return load_image(path)

    monkeypatch.setattr(vdata, "load_image", counting_load)
    good, broken = str(images / "good.png"), str(images / "broken.jpg")
    items = [VQAItem(str(n), img, "q?", "yes", "closed")
             for n, img in enumerate([good, broken, good, broken, str(images / "gone.png")])]
    from modaltune.shared.skips import Skips

    skipped = Skips({"empty answer": 2})
    kept = validate_images(items, skipped)
    assert [i.id for i in kept] == ["0", "2"]
    assert skipped == Counter({"empty answer": 2, "unreadable image": 2, "missing image": 1})
    assert skipped.names["missing image"] == [f"4 ({images / 'gone.png'})"]
    assert skipped.names["unreadable image"] == [f"1 ({broken})", f"3 ({broken})"]
    assert calls == Counter({good: 1, broken: 1})


def test_templates_and_instructions():
    assert len(CAPTION_INSTRUCTIONS) == 4 and len(set(CAPTION_INSTRUCTIONS)) == 4
    assert CAPTION_INSTRUCTIONS[0] == "Briefly describe this image."
    assert VQA_TEMPLATE.format(question="Is it?").endswith("short answer: Is it? [/INST]")
    for template in (VQA_TEMPLATE, CAPTION_TEMPLATE):
        assert template.count(PLACEHOLDER) == 1 and template.startswith("[INST] <img><ImageHere></img> [")
    caption = CAPTION_TEMPLATE.format(instruction="Describe.")
    assert caption == "[INST] <img><ImageHere></img> [caption] Describe. [/INST]"


def test_easy_vqa_caption_rules_on_synthetic_items():
    def q(image, question, answer):
        return VQAItem("x", image, question, answer, closed_type(answer))

    captions, skipped = easy_vqa_captions([
        q("a/train/images/1.png", "is no red shape present?", "no"),  # negated + no: red is there
        q("a/train/images/1.png", "does the image not contain a circle?", "yes"),  # says nothing positive
        q("a/train/images/1.png", "is there a triangle in the image?", "yes"),
        q("a/train/images/2.png", "what shape is present?", "circle"),  # colour unknown
        q("a/train/images/2.png", "is there a blue shape?", "no"),
        q("a/train/images/3.png", "what shape is in the image?", "circle"),
        q("a/train/images/3.png", "what is the gray shape?", "triangle"),  # contradicts the circle
    ])
    assert [(c.id, c.caption) for c in captions] == [("easy-vqa-train-image-1", "A red triangle.")]
    assert skipped == Counter({"no shape and colour facts": 1, "conflicting facts": 1})


# ---- easy-VQA (real packaged data) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy_vqa():
    return {split: read_easy_vqa(split) for split in ("train", "test")}


def test_easy_vqa_splits(easy_vqa):
    (train, train_skipped), (test, test_skipped) = easy_vqa["train"], easy_vqa["test"]
    assert (len(train), len(test)) == (38_575, 9_673)
    assert not train_skipped and not test_skipped
    answers = easy_vqa_answers()
    assert len(answers) == 13 and {"yes", "no", "circle", "rectangle", "triangle", "teal"} <= set(answers)
    assert {i.answer for i in train} == set(answers)
    # the package's README: 28,407 train and 7,136 test questions are yes/no
    assert sum(i.answer_type == "closed" for i in train) == 28_407
    assert sum(i.answer_type == "closed" for i in test) == 7_136
    assert all((i.answer in ("yes", "no")) == (i.answer_type == "closed") for i in train)
    assert len({i.image for i in train}) == 4_000 and len({i.image for i in test}) == 1_000
    first = train[0]
    assert (first.question, first.answer, first.answer_type) == ("what is the blue shape?", "rectangle", "open")
    assert first.image.endswith(os.path.join("train", "images", "0.png"))
    assert load_image(first.image).size == (64, 64)
    with pytest.raises(DataError, match="'train' and 'test'"):
        read_easy_vqa("validation")


def test_easy_vqa_captions(easy_vqa):
    train = easy_vqa["train"][0]
    captions, skipped = easy_vqa_captions(train)
    assert len(captions) + sum(skipped.values()) == 4_000
    assert len(captions) > 3_400 and set(skipped) == {"no shape and colour facts"}
    by_image = {c.image: c for c in captions}
    assert len(by_image) == len(captions)
    first = by_image[train[0].image]
    assert first.caption == "A blue rectangle." and first.id == "easy-vqa-train-image-0"
    colours = set(easy_vqa_answers()) - {"yes", "no", "circle", "rectangle", "triangle"}
    pattern = re.compile(rf"A ({'|'.join(colours)}) (circle|rectangle|triangle)\.")
    assert all(pattern.fullmatch(c.caption) for c in captions)
    # every open answer about a captioned image agrees with its caption
    for item in train:
        caption = by_image.get(item.image)
        if caption and item.answer_type == "open":
            assert item.answer in caption.caption, (item, caption)
    test_captions, test_skipped = easy_vqa_captions(easy_vqa["test"][0])
    assert len(test_captions) + test_skipped["no shape and colour facts"] == 1_000
    assert test_captions[0].id.startswith("easy-vqa-test-image-")


def test_root_only_keeps_images_inside_the_image_folder_and_names_the_rest(images, tmp_path):

    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    rows = [{"image": "good.png", "question": "q?", "answer": "yes"},
            {"image": "../elsewhere.png", "question": "q?", "answer": "no"},
            {"image": str(outside), "question": "q?", "answer": "no"}]
    (images / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, skipped = vdata.read_vqa_jsonl(images / "q.jsonl")
    assert len(items) == 3  # a local tool follows any path by default
    kept = vdata.keep_within(items, images, skipped)
    assert [i.image for i in kept] == [str(images / "good.png")]
    reason = "image path outside the image folder (data.root_only)"
    assert skipped[reason] == 2 and skipped.names[reason][1] == f"3 ({outside})"
