"""Loud registries and the zoo catalogue."""

from __future__ import annotations

import pytest

from modaltune.shared.errors import ModaltuneError
from modaltune.shared.registry import Registry


def test_duplicate_registration_names_both_owners():
    reg = Registry("projector")
    reg.register("linear", object(), owner="pkg_a.build")
    with pytest.raises(ModaltuneError) as err:
        reg.register("linear", object(), owner="pkg_b.build")
    assert "pkg_a.build" in str(err.value) and "pkg_b.build" in str(err.value)


def test_unknown_name_lists_known_ones():
    reg = Registry("encoder")

    @reg.register("timm")
    def build():  # noqa: D401
        return None

    reg.register("clip", object(), owner="x")
    with pytest.raises(ModaltuneError) as err:
        reg.get("tim")
    assert "did you mean 'timm'" in str(err.value) and "clip, timm" in str(err.value)
    assert reg.owner("timm").endswith("build")


def test_zoo_resolution(tmp_path):
    from modaltune.shared import zoo

    assert "gemma-3-270m" in zoo.ZOO.names()
    assert zoo.resolve_model(str(tmp_path)) == (str(tmp_path), "local")
    with pytest.raises(ModaltuneError, match="does not exist"):
        zoo.resolve_model(str(tmp_path / "missing-folder"))
    assert not zoo.is_installed("gemma-3-270m")  # fast tests run with an empty MODALTUNE_HOME


def test_hub_names_resolve_or_fail_in_seconds(tmp_path, monkeypatch):
    import time

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from modaltune.shared import zoo

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    started = time.time()
    with pytest.raises(ModaltuneError, match=r"not in the local hub cache while offline \(HF_HUB_OFFLINE=1\)"):
        zoo.resolve_model("org/some-model")  # the tests run offline
    assert time.time() - started < 5

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def reachable(self, name, revision=None, timeout=None):
        calls.append((name, timeout))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", reachable)
    assert zoo.resolve_model("org/some-model") == ("org/some-model", "hub")
    assert calls == [("org/some-model", 10)]

    def missing(self, name, revision=None, timeout=None):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
        error.args = ("404 Repository Not Found",)
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ModaltuneError, match="the Hugging Face hub has no such model"):
        zoo.resolve_model("org/some-model")

    def unreachable(self, name, revision=None, timeout=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModaltuneError, match="cannot be reached .*Name or service not known.*HF_HUB_OFFLINE=1"):
        zoo.resolve_model("org/some-model")
    # a model in the local hub cache loads from there when the hub cannot be reached
    snap = tmp_path / "hf" / "hub" / "models--org--some-model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    assert zoo.resolve_model("org/some-model") == (str(snap), "hub-cache")


def test_zoo_install_is_atomic_and_idempotent(tmp_path, monkeypatch):
    from modaltune.shared import zoo

    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    entry = zoo.ZooEntry(name="toy-model", kind="causal_lm", description="d", license="MIT", build=build)
    monkeypatch.setitem(zoo.ZOO._items, "toy-model", entry)
    first = zoo.install("toy-model", log=lambda m: None)
    second = zoo.install("toy-model", log=lambda m: None)
    assert first == second and len(calls) == 1 and (first / "config.json").exists()

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(zoo.ZOO._items, "toy-broken", zoo.ZooEntry("toy-broken", "causal_lm", "d", "MIT", build=broken))
    with pytest.raises(RuntimeError):
        zoo.install("toy-broken", log=lambda m: None)
    assert not zoo.model_dir("toy-broken").exists()
    assert not list(zoo.model_dir("toy-broken").parent.glob(".toy-broken*"))


def test_zoo_install_leaves_the_seeded_random_streams_alone(monkeypatch):
    """A build that initialises layers at random must not make a machine's first run differ from the later ones."""
    import random

    import numpy as np
    import torch

    from modaltune.shared import zoo

    def build(folder):
        torch.nn.Linear(64, 64)  # random init, as from_pretrained does before loading weights
        random.random(), np.random.rand(3)
        (folder / "config.json").write_text("{}")

    monkeypatch.setitem(zoo.ZOO._items, "toy-rng", zoo.ZooEntry("toy-rng", "causal_lm", "d", "MIT", build=build))

    def draws():
        return torch.rand(4).tolist(), random.random(), np.random.rand(2).tolist()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    zoo.install("toy-rng", log=lambda m: None)  # builds
    first = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    zoo.install("toy-rng", log=lambda m: None)  # already there
    assert draws() == first


def test_plugins_register_through_entry_points(monkeypatch):
    import sys
    import types

    from modaltune.shared import registry

    mod = types.ModuleType("fake_modaltune_plugin")

    def load_plugin():
        registry.PROJECTORS.register("fake-proj", object(), owner="fake_modaltune_plugin")
        return mod

    class EP:
        name, value = "fake", "fake_modaltune_plugin"
        load = staticmethod(load_plugin)

    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setitem(sys.modules, "fake_modaltune_plugin", mod)
    try:
        assert "fake-proj" in registry.PROJECTORS.names()
    finally:
        registry.PROJECTORS._items.pop("fake-proj", None)
        registry.PROJECTORS._owners.pop("fake-proj", None)

    class Broken:
        name, value = "broken", "nowhere.module"

        @staticmethod
        def load():
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(registry, "entry_points", lambda group: [Broken()])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.raises(ModaltuneError, match="plugin 'broken'"):
        registry.PROJECTORS.names()
