"""Image encoders that yield token sequences ``(B, N, D)``, each with its own preprocessing.

- ``efficientnet-lite0``: the packaged ImageNet weights from the zoo (timm ``tf_efficientnet_lite0``); its last
  feature map, 1280 x 7 x 7 at 224 px, becomes 49 tokens.
- ``timm``: any timm model. CNN feature maps are flattened to tokens; ViT-style models drop their class/prefix
  tokens; ``layer`` picks an intermediate block. EVA models come through here too. Weights from a local file or
  folder (``weights``), or timm's own pretrained weights when the hub is reachable (``pretrained: true``).
- ``clip`` / ``siglip``: transformers vision towers from a local folder or hub id (CLIP's class token dropped;
  ``layer`` picks a hidden state, e.g. -2 as LLaVA does).

Feature caching works at a *depth*: :meth:`ImageEncoder.cache_depth` is :attr:`ImageEncoder.output_depth` for a
frozen encoder (the cache holds its output), and for a timm encoder whose top blocks train (``encoder_tuning.layers``)
it is the index of the lowest trained block, whose input the cache holds; :meth:`ImageEncoder.encode_rest` then runs
only the blocks above it on every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from modaltune.shared.compose import EncoderConfig
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.model import block_input
from modaltune.shared.registry import ENCODERS
from modaltune.shared.zoo import load_error, resolve_model


class ImageEncoder(nn.Module):
    """Base: ``forward(pixel_values) -> (B, N, D)``; ``preprocess(images) -> pixel_values``; a
    :class:`~modaltune.shared.features.CachedEncoder`.

    Subclasses with a block list may override the three depth methods so a partly trained encoder stays cacheable.
    """

    out_dim: int

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def preprocessing_key(self) -> str:
        """Identifies the preprocessing, so cached features are never reused across different ones."""
        return type(self).__name__

    @property
    def output_depth(self) -> int:
        """The depth whose cached states are the encoder's output."""
        return 0

    def cache_depth(self) -> int | None:
        """Depth of what a feature cache may hold: the output when nothing trains, else None (nothing)."""
        return None if any(p.requires_grad for p in self.parameters()) else self.output_depth

    def encode_prefix(self, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
        """The states a cache at ``depth`` keeps."""
        if depth != self.output_depth:
            raise ModaltuneError(f"{type(self).__name__} caches only its output (depth {self.output_depth})")
        return self(pixel_values)

    def encode_rest(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        """The encoder output ``(B, N, D)`` from states cached at ``depth``."""
        if depth != self.output_depth:
            raise ModaltuneError(f"{type(self).__name__} caches only its output (depth {self.output_depth})")
        return states

    def cached_weights(self, depth: int):
        """The frozen weights (trained ones sit above the cached depth and change; frozen ones never do)."""
        return [(n, p) for n, p in self.named_parameters() if not p.requires_grad]


class _Inject(nn.Module):
    """Stands in for the cached lower blocks: ignores its input and returns the cached states."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.states


class TimmEncoder(ImageEncoder):
    """A timm model as a token encoder."""

    def __init__(self, model: nn.Module, *, layer: int | None = None, image_size: int | None = None) -> None:
        super().__init__()
        import timm.data

        self.model = model
        self.layer = layer
        data_cfg = timm.data.resolve_model_data_config(model)
        if image_size is not None:
            data_cfg["input_size"] = (3, image_size, image_size)
            data_cfg["crop_pct"] = 1.0
        self.data_cfg = data_cfg
        self.transform = timm.data.create_transform(**data_cfg, is_training=False)
        self.prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, *data_cfg["input_size"]))
        self.out_dim = probe.size(-1)
        self.num_tokens = probe.size(1)

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images])  # (B, 3, H, W)

    def architecture(self) -> dict[str, Any]:
        """What :meth:`rebuild` makes this encoder from without its weights: the timm architecture, its classes and
        the preprocessing (JSON)."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_cfg.items()}
        return {"timm": self.model.pretrained_cfg["architecture"], "num_classes": self.model.num_classes, "data": data}

    @classmethod
    def rebuild(cls, architecture: dict[str, Any], *, layer: int | None, image_size: int | None) -> TimmEncoder:
        """The encoder :meth:`architecture` describes, with untrained weights (a saved state fills them)."""
        import timm

        data = {k: tuple(v) if isinstance(v, list) else v for k, v in architecture["data"].items()}
        model = timm.create_model(architecture["timm"], pretrained=False, num_classes=architecture["num_classes"],
                                  pretrained_cfg_overlay=data)
        return cls(model.eval(), layer=layer, image_size=image_size)

    @property
    def preprocessing_key(self) -> str:
        c = self.data_cfg
        return f"timm:{c['input_size']}:{c.get('interpolation')}:{c.get('crop_pct')}:{c['mean']}:{c['std']}"

    # -- partial caching: the input of block `depth` of ``model.blocks`` is cached; the blocks above run each step
    def _blocks(self) -> nn.Module | None:
        blocks = getattr(self.model, "blocks", None)
        if self.layer is None and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
            return blocks
        return None

    @property
    def output_depth(self) -> int:
        blocks = self._blocks()
        return len(blocks) if blocks is not None else 0

    def cache_depth(self) -> int | None:
        """The output's depth when frozen; the lowest trained block of ``model.blocks`` when only blocks (and the
        layers after them) train; None when something before the blocks trains or no block list is usable."""
        trained = [n for n, p in self.named_parameters() if p.requires_grad]
        if not trained:
            return self.output_depth
        blocks = self._blocks()
        if blocks is None:
            return None
        before, lowest = False, len(blocks)
        for name in trained:
            rel = name.split("model.", 1)[1] if name.startswith("model.") else name
            if rel.startswith("blocks."):
                lowest = min(lowest, int(rel.split(".")[1]))
            else:
                before = before or not self._after_blocks(rel)
        if before:
            return None
        return min(lowest, len(blocks) - 1)  # something after the blocks trains: cache below the top block at most

    def _after_blocks(self, rel_name: str) -> bool:
        """Whether a parameter belongs to a module that ``forward_features`` runs after the blocks."""
        names = [n for n, _ in self.model.named_children()]
        top = rel_name.split(".")[0]
        return top in names and "blocks" in names and names.index(top) > names.index("blocks")

    def encode_prefix(self, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
        if depth == self.output_depth:
            return self(pixel_values)
        return block_input(self._blocks()[depth], lambda: self.model.forward_features(pixel_values))

    def encode_rest(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        if depth == self.output_depth:
            return states
        blocks = self._blocks()
        rest = [_Inject(states), *list(blocks)[depth:]]
        stand_in = nn.Sequential(*rest) if isinstance(blocks, nn.Sequential) else nn.ModuleList(rest)
        dummy = torch.zeros(states.size(0), *self.data_cfg["input_size"], device=states.device, dtype=states.dtype)
        self.model.blocks = stand_in  # the stem runs on zeros (cheap); the cached states replace the lower blocks
        try:
            return self.forward(dummy)
        finally:
            self.model.blocks = blocks

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            (out,) = self.model.forward_intermediates(pixel_values, indices=[self.layer], intermediates_only=True)
        else:
            out = self.model.forward_features(pixel_values)
            if out.dim() == 3:  # (B, prefix + N, D): ViT-style tokens
                return out[:, self.prefix :]
        if out.dim() == 4:  # (B, C, H, W) -> (B, H*W, C)
            return out.flatten(2).transpose(1, 2)
        return out


class HFVisionEncoder(ImageEncoder):
    """A transformers CLIP or SigLIP vision tower."""

    def __init__(self, model: nn.Module, processor: Any, *, drop_cls: bool, layer: int | None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.drop_cls = drop_cls
        self.layer = layer
        self.out_dim = model.config.hidden_size

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def architecture(self) -> dict[str, Any]:
        """What the ``clip``/``siglip`` builder rebuilds this encoder from without its weights: the vision config
        and the image processor's settings (JSON)."""
        return {"vision": self.model.config.to_dict(), "processor": self.processor.to_dict()}

    @property
    def preprocessing_key(self) -> str:
        return f"hf:{self.processor.to_json_string()}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=self.layer is not None)
        tokens = out.hidden_states[self.layer] if self.layer is not None else out.last_hidden_state
        return tokens[:, 1:] if self.drop_cls else tokens  # (B, N, D)


@ENCODERS.register("efficientnet-lite0")
def build_efficientnet_lite0(cfg: EncoderConfig, log=print, *, architecture: dict[str, Any] | None = None
                             ) -> ImageEncoder:
    from modaltune.shared.zoo import install
    from modaltune.vision.efficientnet_lite import load_lite0

    if architecture is not None:  # rebuilt for a saved state: no zoo install
        return TimmEncoder.rebuild(architecture, layer=cfg.layer, image_size=cfg.image_size)
    return TimmEncoder(load_lite0(install("efficientnet-lite0", log=log)), layer=cfg.layer, image_size=cfg.image_size)


@ENCODERS.register("timm")
def build_timm(cfg: EncoderConfig, log=print, *, architecture: dict[str, Any] | None = None) -> ImageEncoder:
    import timm

    if architecture is not None:  # rebuilt for a saved state: no download, no weights file
        return TimmEncoder.rebuild(architecture, layer=cfg.layer, image_size=cfg.image_size)
    if not cfg.name:
        raise ConfigError("encoder.name must name a timm architecture (e.g. vit_base_patch16_224, eva02_base_patch14_224)")
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=0)
    except Exception as exc:  # unknown arch or no hub
        raise ModaltuneError(f"timm cannot create {cfg.name!r}: {str(exc).splitlines()[0][:200]}") from None
    if cfg.weights:
        model.load_state_dict(_read_weights(Path(cfg.weights).expanduser()), strict=False)
    return TimmEncoder(model.eval(), layer=cfg.layer, image_size=cfg.image_size)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ModaltuneError(f"encoder weights {str(path)!r} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_hf(cfg: EncoderConfig, kind: str, log, architecture: dict[str, Any] | None = None) -> ImageEncoder:
    from transformers import AutoImageProcessor, CLIPVisionModel, SiglipVisionModel
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    if architecture is not None:  # rebuilt for a saved state: no download
        processor = get_image_processor_class_from_name(architecture["processor"]["image_processor_type"])
        return HFVisionEncoder(cls(cls.config_class.from_dict(architecture["vision"])).eval(),
                               processor.from_dict(architecture["processor"]), drop_cls=kind == "clip",
                               layer=cfg.layer)
    if not cfg.name:
        raise ConfigError(f"encoder.name must name a {kind} folder or hub id")
    path, source = resolve_model(cfg.name, log=log)
    try:
        model = cls.from_pretrained(path)
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.name, source, path, f"{kind} vision tower", exc) from None
    return HFVisionEncoder(model.eval(), processor, drop_cls=kind == "clip", layer=cfg.layer)


ENCODERS.register("clip", lambda cfg, log=print, architecture=None: _build_hf(cfg, "clip", log, architecture),
                  owner="modaltune.vision.encoders")
ENCODERS.register("siglip", lambda cfg, log=print, architecture=None: _build_hf(cfg, "siglip", log, architecture),
                  owner="modaltune.vision.encoders")

