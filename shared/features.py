"""One encoder-feature cache for every modality, and the encoder protocol it relies on.

A frozen encoder's output for an input never changes, so it is computed once and reused across epochs, stages and
evaluation passes. When only an encoder's top blocks train, the cache keeps the input of the lowest trained block
instead (its *depth*), and each step runs only the blocks above it (:meth:`CachedEncoder.encode_rest`).

Entries are keyed by the input's content (a file's bytes, an array's values: the same image under two names is
encoded once), and a cache's :attr:`FeatureCache.fingerprint` covers the encoder's frozen weights, its
preprocessing and the depth, so states are never reused for another encoder, preprocessing or depth. With a
``directory`` the states also go to disk (one safetensors file per input under the fingerprint's folder, written
atomically), so a second run, or a second recipe on the same data, loads instead of encoding.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from modaltune.shared.config import doc
from modaltune.shared.errors import DataError


@dataclasses.dataclass
class CacheConfig:
    """The encoder-feature cache of a recipe."""

    mode: Literal["auto", "off"] = doc("auto", "auto: on whenever the encoder's lower part is frozen (and, for Whisper, SpecAugment is "
                            "off) | off: the encoder runs on every step")
    dir: str | None = doc(None, "also keep encoder states on disk here (keyed by input content, encoder weights, "
                                "preprocessing and depth), so later runs load them")


@runtime_checkable
class CachedEncoder(Protocol):
    """What an encoder offers the feature cache (and :class:`~modaltune.shared.compose.ComposedLM`).

    Image encoders (:class:`modaltune.vision.encoders.ImageEncoder`) and Whisper's encoder
    (:class:`modaltune.audio.whisper.WhisperASR`, :class:`modaltune.audio.encoders.WhisperEncoder`) implement it.
    An encoder whose inputs fill only part of its output (a clip in Whisper's 30 s window) may also define
    ``token_count(loaded_input) -> int``: the cache then keeps only those tokens, and the composed model projects
    only those (:func:`token_count`).
    """

    @property
    def preprocessing_key(self) -> str:
        """Identifies the preprocessing (and anything else besides weights that changes the states)."""

    @property
    def out_dim(self) -> int:
        """Width of the output tokens."""

    @property
    def output_depth(self) -> int:
        """The depth whose states are the encoder's output."""

    def preprocess(self, inputs: list[Any]) -> torch.Tensor:
        """Model inputs (pixels, log-mel features) for a batch of loaded inputs (images, waveforms)."""

    def cache_depth(self) -> int | None:
        """Where a cache may take states: :attr:`output_depth` when nothing trains, the lowest trained block when
        only top blocks train, None when something below the first block trains (nothing to cache)."""

    def encode_prefix(self, inputs: torch.Tensor, depth: int) -> torch.Tensor:
        """The states a cache at ``depth`` keeps, ``(B, N, D)``, without running the blocks above ``depth``."""

    def encode_rest(self, states: torch.Tensor, depth: int) -> torch.Tensor:
        """The encoder output ``(B, N, D)`` from states cached at ``depth``."""

    def cached_weights(self, depth: int) -> Iterable[tuple[str, torch.Tensor]]:
        """The weights the states at ``depth`` depend on (they go into the cache's fingerprint)."""


def token_count(encoder: Any, item: Any) -> int | None:
    """How many of an encoder's output tokens hold a loaded input (a clip's real frames; Whisper pads every clip to
    30 s), from the encoder's optional ``token_count(item)``; None: all of them (images)."""
    count = getattr(encoder, "token_count", None)
    return None if count is None else int(count(item))


def content_key(item: Any) -> str:
    """A key for an input's content: a file's bytes (path), an array's float32 values, or a string's text.

    Example:
        >>> content_key(np.zeros(3)) == content_key(np.zeros(3, dtype=np.float64))
        True
    """
    h = hashlib.sha256()
    if isinstance(item, Path) or (isinstance(item, str) and Path(item).is_file()):
        with open(item, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    elif isinstance(item, torch.Tensor):
        h.update(item.detach().float().contiguous().cpu().numpy().tobytes())
    elif isinstance(item, np.ndarray):
        h.update(np.ascontiguousarray(item, dtype=np.float32).tobytes())
    else:
        h.update(str(item).encode())
    return h.hexdigest()[:32]


def encoder_fingerprint(encoder: CachedEncoder, depth: int) -> str:
    """A hash of the encoder's preprocessing, the depth and the weights the states at ``depth`` depend on."""
    h = hashlib.sha256(f"{encoder.preprocessing_key}|depth={depth}/{encoder.output_depth}".encode())
    for name, p in encoder.cached_weights(depth):
        h.update(name.encode() + p.detach().float().sum().item().hex().encode())
    return h.hexdigest()[:16]


def _name(items: list[Any], keys: list[str], key: str, item: Any, names: list[str] | None) -> str:
    """How an error names an input of :meth:`FeatureCache.fill`: its given name, its own name, or its position."""
    i = keys.index(key)
    if names is not None:
        return repr(names[i])
    if isinstance(item, (str, Path)):
        return repr(str(item))
    return f"input {i} of {len(items)} (content key {key})"


def _device(encoder: Any) -> torch.device:
    params = getattr(encoder, "parameters", None)
    first = next(iter(params()), None) if params else None
    return first.device if first is not None else torch.device("cpu")


class FeatureCache:
    """Encoder states per input content at one depth, computed once; optionally kept on disk.

    Args:
        encoder: a :class:`CachedEncoder` (PEFT-wrapped is fine: the base module's methods are used).
        depth: where the states are taken (:meth:`CachedEncoder.cache_depth`); None: the encoder output.
        batch_size: inputs encoded together.
        autocast_dtype: compute the states under this autocast dtype (bf16 training); None: float32.
        directory: also keep the states on disk under ``directory/<fingerprint>/``.
        load: turns a stored input (an image path, a clip) into what :meth:`CachedEncoder.preprocess` takes;
            None: the input itself.
    """

    def __init__(self, encoder: Any, *, depth: int | None = None, batch_size: int = 32,
                 autocast_dtype: torch.dtype | None = None, directory: str | Path | None = None,
                 load: Callable[[Any], Any] | None = None) -> None:
        from modaltune.shared.loss import unwrap_peft

        self.encoder = encoder
        self.base = unwrap_peft(encoder)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.load = load
        out = self.base.output_depth
        self.depth = out if depth is None or depth >= out else depth
        self.complete = self.depth == out  # the states are the encoder output
        self.fingerprint = encoder_fingerprint(self.base, self.depth)
        self.directory = Path(directory).expanduser() / self.fingerprint if directory else None
        self.states: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}  # encoding seconds per input (passes that reuse states are charged them)
        self.names: dict[str, str] = {}  # an input's name (an image path) -> its content key
        self.computed = 0
        self.loaded = 0

    def _file(self, key: str) -> Path | None:
        return self.directory / f"{key}.safetensors" if self.directory else None

    def key(self, item: Any) -> str:
        """The content key of ``item``: a file's bytes, else what ``load`` makes of a name (a clip id's waveform),
        else the item itself; a name is hashed once and remembered."""
        if isinstance(item, (str, Path)):
            name = str(item)
            if name not in self.names:
                is_file = Path(name).is_file()
                self.names[name] = content_key(item if is_file or self.load is None else self.load(item))
            return self.names[name]
        return content_key(item)

    @torch.no_grad()
    def fill(self, items: list[Any], desc: str = "encoding", names: list[str] | None = None) -> list[str]:
        """Make sure every item has cached states (encoded in the order of first appearance); returns their keys.

        States are checked: a stored file holding NaN or infinite values is encoded again, and an input whose new
        states hold any is an error (nothing is cached for it).

        Args:
            names: what to call each item in that error (a clip id); None: the item itself when it is a name (an
                image path, a clip id), else its position.

        Raises:
            DataError: the encoder gives NaN or infinite states for an item.
        """
        from safetensors.torch import load_file, save_file

        from modaltune.shared.io import atomic_write

        keys = [self.key(item) for item in items]
        todo: dict[str, Any] = {}
        for key, item in zip(keys, items):
            if key in self.states or key in todo:
                continue
            path = self._file(key)
            if path is not None and path.is_file():
                began = time.perf_counter()
                stored = load_file(str(path))["states"]
                if bool(torch.isfinite(stored).all()):  # else a damaged file: encoded again and rewritten
                    self.states[key] = stored
                    self.seconds[key] = time.perf_counter() - began
                    self.loaded += 1
                    continue
            todo[key] = item
        pending = list(todo.items())
        was = self.encoder.training
        self.encoder.eval()
        device = _device(self.encoder)
        try:
            for start in tqdm(range(0, len(pending), self.batch_size), desc=desc, leave=False,
                              disable=len(pending) <= self.batch_size):
                chunk = pending[start : start + self.batch_size]
                began = time.perf_counter()
                loaded = [self.load(item) if self.load else item for _, item in chunk]
                inputs = self.base.preprocess(loaded).to(device)
                with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    states = self.base.encode_prefix(inputs, self.depth).float().cpu()  # (B, N, D)
                per_item = (time.perf_counter() - began) / len(chunk)
                for (key, item), state, wave in zip(chunk, states, loaded):
                    count = token_count(self.base, wave)  # only the tokens that hold the input are kept
                    state = (state if count is None else state[:count]).contiguous()  # (N, D)
                    if not bool(torch.isfinite(state).all()):
                        raise DataError(
                            f"the encoder's states for {_name(items, keys, key, item, names)} hold NaN or infinite "
                            "values, so nothing was cached for it: check that input for extreme values, or encode "
                            "in float32 (train.precision: fp32) if half precision overflows")
                    self.states[key] = state
                    self.seconds[key] = per_item
                    self.computed += 1
                    path = self._file(key)
                    if path is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write(path, lambda tmp, s=state: save_file({"states": s}, tmp))
        finally:
            self.encoder.train(was)
        return keys

    def get(self, item_or_key: Any) -> torch.Tensor:
        """The cached states ``(N, D)`` of an input (by name) or a key."""
        if isinstance(item_or_key, str) and item_or_key in self.states:
            return self.states[item_or_key]
        return self.states[self.key(item_or_key)]

    def encoder_output(self, keys: list[str]) -> torch.Tensor:
        """Encoder output ``(B, N, D)`` of cached inputs of one length (runs the blocks above the cached depth)."""
        states = torch.stack([self.states[k] for k in keys]).to(_device(self.encoder))
        if self.complete:
            return states
        with torch.autocast(states.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.base.encode_rest(states, self.depth).float()

    def batch_fields(self) -> dict[str, int]:
        """What a batch of these states carries besides ``features``: their depth when it is not the output."""
        return {} if self.complete else {"features_depth": self.depth}
