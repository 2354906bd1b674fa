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
    assert zoo.resolve_model("org/some-model") == ("org/some-model", "hub")
    with pytest.raises(ModaltuneError, match="does not exist"):
        zoo.resolve_model(str(tmp_path / "missing-folder"))
    assert not zoo.is_installed("gemma-3-270m")  # fast tests run with an empty MODALTUNE_HOME


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
