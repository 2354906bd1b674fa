"""Vision-language data: Med-VQA and caption layouts read into plain items, with prompt templates.

A Med-VQA recipe trains in two stages: stage 1 aligns the projector on image captions (:class:`CaptionItem`,
prompted with :data:`CAPTION_TEMPLATE` and one of :data:`CAPTION_INSTRUCTIONS`), stage 2 tunes on question-answer
triples (:class:`VQAItem`, prompted with :data:`VQA_TEMPLATE`). Every loader returns ``(items, skipped)``: a bad row
never stops loading, it is counted in ``skipped`` under its reason ("missing image", "empty question", "image: expected a file
name, got int", ...) so a report can say what was lost. Only a missing or malformed file as a whole (or an invalid JSON line) raises
:class:`~modaltune.shared.errors.DataError`.

Loaders check that image files exist; :func:`validate_images` also decodes each distinct image once.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from modaltune.shared.errors import DataError
from modaltune.shared.io import iter_jsonl, lines, read_text, within
from modaltune.shared.skips import Skips
from modaltune.vision.images import ImageReadError, load_image

PLACEHOLDER = "<ImageHere>"
VQA_TEMPLATE = (
    "[INST] <img><ImageHere></img> [VQA] Based on the image, respond to this question with a short answer: "
    "{question} [/INST]"
)
CAPTION_TEMPLATE = "[INST] <img><ImageHere></img> [caption] {instruction} [/INST]"
CAPTION_INSTRUCTIONS = (
    "Briefly describe this image.",
    "Write a short caption for this image.",
    "What does this image show? Answer in one sentence.",
    "Summarize the content of this image in a few words.",
)

EASY_VQA_PACKAGE = "easy-vqa==1.0"
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")


@dataclasses.dataclass
class VQAItem:
    """One visual question with its answer.

    Attributes:
        id: Identifier from the source layout (its own id field, else the row index or line number).
        image: Path of the image file.
        question: The question text.
        answer: The reference answer.
        answer_type: ``"closed"`` (yes/no style, a fixed answer set) or ``"open"``.
        rationale: What the image shows, said before the answer (``data.closed_rationale``), or None.
    """

    id: str
    image: str
    question: str
    answer: str
    answer_type: str
    rationale: str | None = None


@dataclasses.dataclass
class CaptionItem:
    """One image with a caption, for stage-1 alignment.

    Attributes:
        id: Identifier from the source layout.
        image: Path of the image file.
        caption: The caption text.
    """

    id: str
    image: str
    caption: str


def closed_type(answer: str, given: str | None = None) -> str:
    """Classify a question as ``"closed"`` or ``"open"``.

    Args:
        answer: The reference answer, used when the layout gives no type.
        given: The layout's own type (``CLOSED``/``OPEN`` in any case, surrounding spaces ignored); any other value
            is ignored.

    Returns:
        The given type when it is CLOSED or OPEN, else ``"closed"`` for a yes/no answer and ``"open"`` otherwise.
    """
    if isinstance(given, str) and given.strip().lower() in ("closed", "open"):
        return given.strip().lower()
    return "closed" if str(answer).strip().lower().rstrip(".") in YES_NO else "open"


# ---- file helpers -------------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A field as stripped text: strings stripped, numbers as written, anything else (None, lists) empty.

    Lists and dicts are never stringified; :func:`_wrong_type` names them where the field matters.
    """
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return ""


def _wrong_type(row: dict[str, Any], image_key: str | None) -> str | None:
    """The skip reason of a row whose image, question or answer field has the wrong type, else None.

    The image must be a file name and the question a string; the answer a string or a number (VQA-RAD writes
    counts as numbers). Absent fields are left to the emptiness checks.
    """
    checks = [("question", "a string", (str,)), ("answer", "a string or a number", (str, int, float))]
    if image_key:
        checks.insert(0, (image_key, "a file name", (str,)))
    for key, expected, types in checks:
        value = row.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"{key}: expected {expected}, got {type(value).__name__}"
    return None


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the path")
    return path


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; point it at the folder holding the images")
    return path


def _json_list(path: Path, text: str | None = None) -> list[Any]:
    """A file holding one JSON list (``text``: its contents when already read)."""
    try:
        data = json.loads(read_text(path) if text is None else text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); fix the file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def _jsonl(path: Path, text: str | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSONL file (``text``: its contents when already read)."""
    return iter_jsonl(path, read_text(path) if text is None else text)


def _json_rows(path: Path) -> list[tuple[int, Any]]:
    """Rows of a JSON list (numbered from 0) or of a JSONL file (numbered by line), told apart by content."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        return list(enumerate(_json_list(path, text)))
    return list(_jsonl(path, text))


def _find_image(image_dir: Path, name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Path | None:
    """The image file ``name`` in ``image_dir``, trying ``name`` as given and then with each extension added."""
    if not name:
        return None
    path = image_dir / name
    if path.is_file():
        return path
    for ext in extensions:
        candidate = path.with_name(path.name + ext)
        if candidate.is_file():
            return candidate
    return None


def _vqa_item(
    row: Any,
    *,
    id_: Any,
    image: Path | None,
    image_key: str | None = None,
    type_key: str | None = None,
    skipped: Skips,
) -> VQAItem | None:
    """Build a VQAItem from a row's ``question`` and ``answer``, or count why not and return None (``image_key``:
    the row's image field, whose type is checked with the question's and the answer's)."""
    question, answer = _text(row.get("question")), _text(row.get("answer"))
    reason = _wrong_type(row, image_key)
    if reason is None:
        if not question:
            reason = "empty question"
        elif not answer:
            reason = "empty answer"
        elif image is None or not image.is_file():
            reason = "missing image"
    if reason:
        skipped.add(reason, id_)
        return None
    given = row.get(type_key) if type_key else None
    return VQAItem(str(id_), str(image), question, answer, closed_type(answer, given))


# ---- Med-VQA layouts ----------------------------------------------------------------------------------------------


def read_vqa_rad(json_path: str | Path, image_dir: str | Path) -> tuple[list[VQAItem], Skips]:
    """Read VQA-RAD: a JSON list of rows with ``image_name``, ``question``, ``answer`` and ``answer_type``.

    Args:
        json_path: The VQA-RAD JSON file (e.g. ``VQA_RAD Dataset Public.json``).
        image_dir: Folder holding the images named by ``image_name``.

    Returns:
        ``(items, skipped)``: ids are ``qid`` when present, else the row index; the type is the row's
        ``answer_type`` (CLOSED/OPEN), falling back to the answer.

    Raises:
        DataError: The file is missing or not a JSON list, or ``image_dir`` is not a folder.
    """
    path = _existing_file(json_path, "VQA-RAD file")
    folder = _existing_dir(image_dir, "VQA-RAD image folder")
    items, skipped = [], Skips()
    for index, row in enumerate(_json_list(path)):
        if not isinstance(row, dict):
            skipped.add("malformed row", f"{path.name}[{index}]")
            continue
        name = _text(row.get("image_name"))
        id_ = row["qid"] if _text(row.get("qid")) else index
        item = _vqa_item(row, id_=id_, image=folder / name if name else None, image_key="image_name",
                         type_key="answer_type", skipped=skipped)
        if item:
            items.append(item)
    return items, skipped


def read_slake(json_path: str | Path, image_dir: str | Path) -> tuple[list[VQAItem], Skips]:
    """Read SLAKE: a JSON list of rows with ``img_name``, ``question``, ``answer``, ``answer_type``, ``q_lang``.

    Only English rows (``q_lang`` "en", or no ``q_lang``) are kept; the others are counted as "not English".

    Args:
        json_path: A SLAKE split file (``train.json``, ``validate.json`` or ``test.json``).
        image_dir: The ``imgs`` folder; ``img_name`` is relative to it and may contain a subfolder
            (``xmlab102/source.jpg``).

    Returns:
        ``(items, skipped)`` with ids from ``qid`` (else the row index).

    Raises:
        DataError: The file is missing or not a JSON list, or ``image_dir`` is not a folder.
    """
    path = _existing_file(json_path, "SLAKE file")
    folder = _existing_dir(image_dir, "SLAKE image folder")
    items, skipped = [], Skips()
    for index, row in enumerate(_json_list(path)):
        if not isinstance(row, dict):
            skipped.add("malformed row", f"{path.name}[{index}]")
            continue
        lang = _text(row.get("q_lang")).lower()
        if lang and lang != "en":
            skipped.add("not English", row["qid"] if _text(row.get("qid")) else index)
            continue
        name = _text(row.get("img_name"))
        id_ = row["qid"] if _text(row.get("qid")) else index
        item = _vqa_item(row, id_=id_, image=folder / name if name else None, image_key="img_name",
                         type_key="answer_type", skipped=skipped)
        if item:
            items.append(item)
    return items, skipped


def read_pathvqa(path: str | Path, image_dir: str | Path) -> tuple[list[VQAItem], Skips]:
    """Read PathVQA from a JSON list or a JSONL file of rows with ``image``, ``question`` and ``answer``.

    Args:
        path: The JSON or JSONL file (told apart by content: a file starting with ``[`` is a JSON list).
        image_dir: Folder holding the images; ``image`` is a file name with or without its extension (``.jpg``,
            ``.png`` and ``.jpeg`` are tried).

    Returns:
        ``(items, skipped)``: ids from ``id``/``qid`` when present, else the row index (JSON) or line number
        (JSONL); the type comes from the answer (yes/no is closed).

    Raises:
        DataError: The file is missing, invalid JSON (naming the line for JSONL), or ``image_dir`` is not a folder.
    """
    file = _existing_file(path, "PathVQA file")
    folder = _existing_dir(image_dir, "PathVQA image folder")
    items, skipped = [], Skips()
    for number, row in _json_rows(file):
        if not isinstance(row, dict):
            skipped.add("malformed row", f"{file.name}:{number}")
            continue
        id_ = next((row[k] for k in ("id", "qid") if _text(row.get(k))), number)
        item = _vqa_item(row, id_=id_, image=_find_image(folder, _text(row.get("image"))), image_key="image",
                         skipped=skipped)
        if item:
            items.append(item)
    return items, skipped


def read_vqa_jsonl(path: str | Path, image_root: str | Path | None = None) -> tuple[list[VQAItem], Skips]:
    """Read the generic VQA layout: JSONL rows with ``image``, ``question``, ``answer`` and optional ``type``/``id``.

    Args:
        path: The JSONL file.
        image_root: Folder that relative ``image`` paths resolve against (default: the JSONL file's folder).
            Absolute paths are used as they are.

    Returns:
        ``(items, skipped)``: ids from ``id`` when present, else the line number; the type is ``type``
        (closed/open) when given, else from the answer.

    Raises:
        DataError: The file is missing or has an invalid JSON line (the message names the line).
    """
    file = _existing_file(path, "VQA JSONL file")
    root = Path(image_root) if image_root is not None else file.parent
    items, skipped = [], Skips()
    for lineno, row in _jsonl(file):
        if not isinstance(row, dict):
            skipped.add("malformed row", f"{file.name}:{lineno}")
            continue
        name = _text(row.get("image"))
        image = (root / name if not Path(name).is_absolute() else Path(name)) if name else None
        id_ = row["id"] if _text(row.get("id")) else lineno
        item = _vqa_item(row, id_=id_, image=image, image_key="image", type_key="type", skipped=skipped)
        if item:
            items.append(item)
    return items, skipped


# ---- captions -----------------------------------------------------------------------------------------------------


def read_roco_captions(image_dir: str | Path, caption_file: str | Path) -> tuple[list[CaptionItem], Skips]:
    """Read ROCO-style captions.

    The caption file is either tab-separated text (``.txt``/``.tsv``/other: one ``ID<TAB>caption`` per line, an
    optional ``id<TAB>caption`` header is skipped) or a ``.csv`` with a header holding an ``id``, ``name`` or
    ``image`` column and a ``caption`` column (matched case-insensitively). The image of a row is the name as given
    in ``image_dir``, else ``<id>.jpg``, ``<id>.png`` or ``<id>.jpeg``.

    Args:
        image_dir: Folder holding the images.
        caption_file: The caption file.

    Returns:
        ``(items, skipped)`` with the row's id/name as item id.

    Raises:
        DataError: A file or folder is missing, or the CSV lacks the needed columns.
    """
    file = _existing_file(caption_file, "caption file")
    folder = _existing_dir(image_dir, "caption image folder")
    pairs: list[tuple[str, str, str]] = []  # (file:line, id, caption); an empty id marks a malformed row
    if file.suffix.lower() == ".csv":
        reader = csv.reader(io.StringIO(read_text(file), newline=""))
        header = [h.strip().lower() for h in next(reader, [])]
        id_col = next((header.index(c) for c in ("id", "name", "image") if c in header), None)
        if id_col is None or "caption" not in header:
            raise DataError(
                f"{file}: a caption CSV needs an id (or name, or image) column and a caption column; "
                f"found {', '.join(header) or 'no header'}"
            )
        cap_col = header.index("caption")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            ok = len(row) > max(id_col, cap_col)
            pairs.append((f"{file.name}:{reader.line_num}", row[id_col].strip() if ok else "",
                          row[cap_col].strip() if ok else ""))
    else:
        for lineno, line in enumerate(lines(read_text(file)), start=1):
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            if lineno == 1 and key.strip().lower() in ("id", "name", "image") and caption.strip().lower() == "caption":
                continue
            pairs.append((f"{file.name}:{lineno}", key.strip() if tab else "", caption.strip()))
    items, skipped = [], Skips()
    for where, key, caption in pairs:
        if not key:
            skipped.add("malformed row", where)
            continue
        if not caption:
            skipped.add("empty caption", key)
            continue
        image = _find_image(folder, key)
        if image is None:
            skipped.add("missing image", key)
            continue
        items.append(CaptionItem(key, str(image), caption))
    return items, skipped


# ---- easy-VQA (packaged real data) --------------------------------------------------------------------------------


def _easy_vqa_module():
    """Import ``easy_vqa``, pip-installing the pinned package first when it is missing."""
    from modaltune.shared.zoo import ensure_packages

    ensure_packages((EASY_VQA_PACKAGE,))
    importlib.invalidate_caches()  # it may have been installed by this process just now
    try:
        return importlib.import_module("easy_vqa")
    except ImportError as exc:
        raise DataError(f"cannot import easy_vqa ({exc}); run pip install '{EASY_VQA_PACKAGE}'") from None


def read_easy_vqa(split: str) -> tuple[list[VQAItem], Skips]:
    """Read one split of easy-VQA (64x64 PNGs of coloured shapes) from the ``easy-vqa`` PyPI package.

    The package is pip-installed on first use. Train has 38,575 questions on 4,000 images, test 9,673 on 1,000;
    yes/no questions are closed, colour and shape questions open (13 answers in all).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(items, skipped)`` with ids ``easy-vqa-<split>-<row index>``.

    Raises:
        DataError: Unknown split, or the package cannot be imported.
    """
    if split not in ("train", "test"):
        raise DataError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    module = _easy_vqa_module()
    if split == "train":
        questions, answers, image_ids = module.get_train_questions()
        paths = module.get_train_image_paths()
    else:
        questions, answers, image_ids = module.get_test_questions()
        paths = module.get_test_image_paths()
    items, skipped = [], Skips()
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        image = paths.get(image_id)
        item = _vqa_item({"question": question, "answer": answer}, id_=f"easy-vqa-{split}-{index}",
                         image=Path(image) if image else None, skipped=skipped)
        if item:
            items.append(item)
    return items, skipped


def easy_vqa_answers() -> list[str]:
    """The 13 possible easy-VQA answers (yes, no, 3 shapes, 8 colours), in the package's order."""
    return list(_easy_vqa_module().get_answers())


_WHAT_SHAPE = re.compile(r"what shape (?:is in the image|does the image contain|is present)\?")
_WHAT_IS_COLOUR_SHAPE = re.compile(r"what is the (?P<colour>\w+) shape\?")
_WHAT_COLOUR = re.compile(r"(?:what colou?r is the|what is the colou?r of the) (?P<thing>\w+)\?")
_YES_NO = re.compile(
    r"(?:is (?P<is>no |a )|is there (?P<there>not )?a |does the image (?P<contain>not )?contain a )"
    r"(?P<word>\w+)(?P<shape_word> shape)?(?: present| in the image)?\?"
)


def _easy_vqa_facts(question: str, answer: str) -> dict[str, str]:
    """The shape and/or colour one easy-VQA question-answer pair reveals (empty when it reveals neither).

    Open questions name them directly ("what is the blue shape?" -> rectangle: colour blue, shape rectangle).
    Yes/no questions reveal a fact when the answer affirms presence: "is there a circle?" -> yes, or a negated
    phrasing ("is there not a red shape?", "is no circle present?", "does the image not contain ...") -> no.
    """
    q, a = question.strip().lower(), answer.strip().lower()
    if _WHAT_SHAPE.fullmatch(q):
        return {"shape": a}
    if m := _WHAT_IS_COLOUR_SHAPE.fullmatch(q):
        return {"shape": a, "colour": m["colour"]}
    if m := _WHAT_COLOUR.fullmatch(q):
        return {"colour": a} if m["thing"] == "shape" else {"colour": a, "shape": m["thing"]}
    if (m := _YES_NO.fullmatch(q)) and a in YES_NO:
        negated = m["is"] == "no " or bool(m["there"]) or bool(m["contain"])
        if (a == "yes") != negated:
            return {"colour" if m["shape_word"] else "shape": m["word"]}
    return {}


def easy_vqa_captions(items: Iterable[VQAItem]) -> tuple[list[CaptionItem], Skips]:
    """Derive one stage-1 caption per easy-VQA image ("A blue circle.") from the answers about that image.

    Every question about an image that reveals its shape or colour (see :func:`_easy_vqa_facts`) contributes; an
    image gets a caption only when exactly one shape and one colour are known.

    Args:
        items: easy-VQA items (from :func:`read_easy_vqa`).

    Returns:
        ``(captions, skipped)``: captions in order of each image's first question, with ids
        ``easy-vqa-<split>-image-<image id>``; ``skipped`` counts images, not questions: "no shape and colour
        facts" when one of the two is unknown, "conflicting facts" when the answers disagree.
    """
    facts: dict[str, dict[str, set[str]]] = {}
    for item in items:
        known = facts.setdefault(item.image, {"shape": set(), "colour": set()})
        for key, value in _easy_vqa_facts(item.question, item.answer).items():
            known[key].add(value)
    captions, skipped = [], Skips()
    for image, known in facts.items():
        shapes, colours = known["shape"], known["colour"]
        if len(shapes) > 1 or len(colours) > 1 or (shapes and not shapes <= set(SHAPES)):
            reason = "conflicting facts"
        elif not shapes or not colours:
            reason = "no shape and colour facts"
        else:
            path = Path(image)
            captions.append(CaptionItem(f"easy-vqa-{path.parent.parent.name}-image-{path.stem}", image,
                                        f"A {next(iter(colours))} {next(iter(shapes))}."))
            continue
        skipped.add(reason, image)
    return captions, skipped


# ---- image check --------------------------------------------------------------------------------------------------


def keep_within(items: Iterable[VQAItem | CaptionItem], root: str | Path, skipped: Skips) -> list:
    """The items whose image lies inside ``root`` (``data.root_only``); the others are counted and named."""
    kept = []
    for item in items:
        if within(item.image, root):
            kept.append(item)
        else:
            skipped.add("image path outside the image folder (data.root_only)", f"{item.id} ({item.image})")
    return kept


def validate_images(items: Iterable[VQAItem | CaptionItem], skipped: Skips) -> list:
    """Keep the items whose image exists and decodes; each distinct image is loaded once.

    Args:
        items: VQA or caption items.
        skipped: the tally to add "missing image", "unreadable image" and the more exact reasons of
            :class:`~modaltune.vision.images.ImageReadError` ("non-finite samples") to (one count per dropped item).

    Returns:
        The usable items, in their original order.
    """
    verdicts: dict[str, str | None] = {}  # image -> skip reason, None when fine
    kept = []
    for item in items:
        if item.image not in verdicts:
            if not Path(item.image).is_file():
                verdicts[item.image] = "missing image"
            else:
                try:
                    load_image(item.image)
                    verdicts[item.image] = None
                except ImageReadError as exc:
                    verdicts[item.image] = exc.reason
        reason = verdicts[item.image]
        if reason:
            skipped.add(reason, f"{item.id} ({item.image})")
        else:
            kept.append(item)
    return kept
