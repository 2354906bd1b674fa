"""Config schemas: unknown keys, types, overrides, and every shipped YAML against its schema."""

from __future__ import annotations

import dataclasses
import re

import pytest

from modaltune.shared.config import from_dict, load_config, parse_overrides
from modaltune.shared.errors import ConfigError
from modaltune.shared.recipe import get_recipe


@dataclasses.dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10
    names: list[str] = dataclasses.field(default_factory=list)
    mode: str | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, {"inner": {"stpes": 3}})
    msg = str(err.value)
    assert "'inner.stpes'" in msg and "did you mean 'steps'" in msg and "lr, steps, names, mode" in msg


@pytest.mark.parametrize(
    "data, fragment",
    [({"flag": "yes"}, "true or false"), ({"inner": {"steps": 1.5}}, "whole number"),
     ({"inner": {"lr": "fast"}}, "expected a number"), ({"inner": 3}, "expected a mapping")],
)
def test_wrong_types_fail_with_the_path(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(Outer, data)


def test_overrides_are_yaml_values():
    assert parse_overrides(["a.b=1e-4", "c=[x, y]", "d=true", "e=null"]) == {
        "a.b": "1e-4", "c": ["x", "y"], "d": True, "e": None}
    cfg = from_dict(Outer, {"inner": {"lr": "1e-4", "names": "q_proj"}})
    assert cfg.inner.lr == pytest.approx(1e-4) and cfg.inner.names == ["q_proj"]
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["justakey"])


def test_quick_and_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 100\nquick:\n  inner.steps: 5\n")

    @dataclasses.dataclass
    class WithQuick(Outer):
        quick: dict = dataclasses.field(default_factory=dict)

    assert load_config(WithQuick, path).inner.steps == 100
    assert load_config(WithQuick, path, quick=True).inner.steps == 5
    assert load_config(WithQuick, path, ["inner.steps=7"], quick=True).inner.steps == 7


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(Outer, path)


def _shipped():
    from modaltune.shared.recipe import all_recipes

    return [(name, r) for name, r in all_recipes().items() if not isinstance(r, str)]


@pytest.mark.parametrize("name, recipe", _shipped())
def test_every_shipped_yaml_loads_and_documents_itself(name, recipe):
    path = recipe.default_config_path()
    cfg = load_config(recipe.config_cls, path)
    quick = load_config(recipe.config_cls, path, quick=True)
    assert cfg != quick
    lines = path.read_text().splitlines()
    assert lines[0].startswith(f"# modaltune run {name}")
    for line in lines:
        if re.match(r"^\s*[A-Za-z_.]+:", line):
            assert "#" in line, f"undocumented key: {line!r}"


def test_resolved_config_round_trips(tmp_path):
    import yaml

    from modaltune.shared.config import dump_yaml, to_dict

    recipe = get_recipe("text-sft")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), ["llm.method=dora", "train.lr=3e-4"])
    dump_yaml(cfg, tmp_path / "c.yaml")
    again = from_dict(recipe.config_cls, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg and again.llm.method == "dora"
    assert to_dict(again)["train"]["lr"] == pytest.approx(3e-4)


def test_list_items_can_be_overridden():
    from modaltune.shared.config import apply_dotted

    data = {"stages": [{"name": "a", "steps": 1}, {"name": "b", "steps": 2}]}
    out = apply_dotted(data, {"stages[1].steps": 9, "stages[0].name": "z"}, "cli")
    assert out["stages"] == [{"name": "z", "steps": 1}, {"name": "b", "steps": 9}]
    assert data["stages"][1]["steps"] == 2  # the input is not modified
    with pytest.raises(ConfigError, match="has no item 5"):
        apply_dotted(data, {"stages[5].steps": 1}, "cli")


def test_a_bare_off_is_the_word_not_a_boolean():
    """YAML 1.1 reads `off` as false; a string field takes the word the user typed."""
    from modaltune.shared.recipe import get_recipe

    recipe = get_recipe("domain-asr")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(), ["cache.mode=off"])
    assert cfg.cache.mode == "off"
    with pytest.raises(ConfigError, match="cache.mode: 'on' is not one of 'auto', 'off'"):
        load_config(recipe.config_cls, recipe.default_config_path(), ["cache.mode=yes"])


def test_run_help_lists_every_config_key_with_type_value_and_meaning(capsys):
    from modaltune.shared.cli import main
    from modaltune.shared.config import config_reference
    from modaltune.shared.recipe import get_recipe, recipe_config

    assert main(["run", "text-sft", "--help"]) == 0
    out = capsys.readouterr().out
    cfg = recipe_config(get_recipe("text-sft"))
    keys = [k for k, t, _, _ in config_reference(type(cfg), cfg) if t != "section"]
    assert len(keys) > 40 and all(f"  {k} = " in out for k in keys)
    assert "train.lr = 0.0005   [float]" in out  # the shipped value, not the schema default
    assert "data.train_on = all   [all | last]" in out and "loss on every assistant turn" in out
    assert main(["run"]) == 2 and "Give a recipe" in capsys.readouterr().out


def test_config_prints_the_resolved_yaml_and_a_partial_file_overlays_the_shipped_one(tmp_path, capsys):
    import yaml

    from modaltune.shared.cli import main

    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  max_steps: 7\nllm:\n  r: 4\n")
    assert main(["config", "text-sft", "--config", str(mine), "eval.max_new_tokens=9"]) == 0
    captured = capsys.readouterr()
    resolved = yaml.safe_load(captured.out)
    assert resolved["train"]["max_steps"] == 7 and resolved["llm"]["r"] == 4  # mine
    assert resolved["train"]["lr"] == 5e-4  # the shipped recipe's, not the schema's 2e-4
    assert resolved["eval"]["max_new_tokens"] == 9  # command line
    assert "laid over the shipped text-sft.yaml" in captured.err
    assert main(["config", "text-sft", "--quick"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["max_steps"] != 90
    mine.write_text("train:\n  max_stepz: 7\n")
    assert main(["config", "text-sft", "--config", str(mine)]) == 2
    assert "max_steps" in capsys.readouterr().err  # the misspelt key is named with the right one
