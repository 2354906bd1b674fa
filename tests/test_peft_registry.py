"""PEFT methods as registered objects: a loud registry, method lists generated from it, and a new method (the
worked example of docs/extending.md) that plugs in from one module."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modaltune.shared.peft as peft_pkg
from modaltune.shared.config import field_docs, from_dict
from modaltune.shared.errors import ConfigError, ModaltuneError
from modaltune.shared.peft import ComponentConfig, PeftMethod, method_names, method_of, register_method
from modaltune.shared.peft.docs import SCOPES, method_choices, method_help, method_markdown, method_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "peft_method_loha.py"

# every `method:` key of a shipped YAML, by (file, section), and the scope (SCOPES) its comment lists
YAML_SCOPES = {
    ("text-sft.yaml", "llm"): "trains",
    ("text-dpo.yaml", "llm"): "weights_or_adapters",
    ("text-multitask.yaml", "llm"): "lora",
    ("audio-llm.yaml", "encoder_tuning"): "encoder",
    ("audio-llm.yaml", "llm"): "spliced",
    ("med-vqa.yaml", "encoder_tuning"): "encoder",
    ("med-vqa.yaml", "llm"): "spliced",
    ("domain-asr.yaml", "encoder"): "spliced",
    ("domain-asr.yaml", "decoder"): "spliced",
}


def _yaml_method_comments() -> dict[tuple[str, str], str]:
    found = {}
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        section = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.match(r"^[A-Za-z_]+:", line):
                section = line.split(":", 1)[0]
            m = re.match(r"^\s+method:[^#]*#\s*(.*)$", line)
            if m:
                found[(path.name, section)] = m.group(1).split(";")[0].strip()
    return found


def test_every_method_list_is_the_registry():
    """--help, the package docstring, docs/cli.md and each YAML comment list exactly the registered methods (a
    method that is registered but not listed fails here)."""
    names = method_names()
    assert {"frozen", "full", "hft", "lora", "dora", "dylora", "lora_fa", "qlora", "lora8bit", "ia3",
            "prompt_tuning", "prefix_tuning"} <= set(names)
    assert field_docs(ComponentConfig)["method"] == method_help() and all(n in method_help() for n in names)
    assert method_table() in peft_pkg.__doc__
    assert method_markdown() in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    comments = _yaml_method_comments()
    assert set(comments) == set(YAML_SCOPES), "a YAML method key is not in YAML_SCOPES (or one is gone)"
    for key, scope in YAML_SCOPES.items():
        assert comments[key] == method_choices(scope), f"{key}: regenerate with method_choices({scope!r})"


def test_a_method_list_misses_a_new_method(monkeypatch):
    """The comparison can fail: one more registered method changes every generated list."""
    before = {scope: method_choices(scope) for scope in SCOPES}

    class Extra(PeftMethod):
        name, help, adapter_kind, lora_family = "extra_probe", "probe", "extra_probe", True

    register_method(Extra())
    try:
        assert all(method_choices(scope) != before[scope] for scope in ("any", "lora", "spliced"))
        assert method_table() not in peft_pkg.__doc__
    finally:
        peft_pkg.unregister_method("extra_probe")


def test_registry_is_loud():
    class Lora2(PeftMethod):
        name, help = "lora", "a second lora"

    with pytest.raises(ModaltuneError) as err:
        register_method(Lora2())
    assert "modaltune.shared.peft.lora.Lora" in str(err.value) and "Lora2" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_dict(ComponentConfig, {"method": "lroa"}, "llm")
    assert "llm.method" in str(err.value) and "did you mean 'lora'" in str(err.value)
    assert "prefix_tuning" in str(err.value)  # the known ones are listed
    with pytest.raises(ConfigError, match="eval_ranks applies to method dylora only"):
        from_dict(ComponentConfig, {"method": "lora", "eval_ranks": [2]}, "llm")


def test_method_properties():
    props = {n: method_of(ComponentConfig(method=n)) for n in method_names()}
    assert [n for n, m in props.items() if not m.trains] == ["frozen"]
    assert [n for n, m in props.items() if m.full_weights] == ["full"]
    assert {n for n, m in props.items() if m.virtual_tokens} == {"prompt_tuning", "prefix_tuning"}
    assert {n: m.quantised for n, m in props.items() if m.quantised} == {"qlora": "4bit", "lora8bit": "8bit"}
    assert {n for n, m in props.items() if m.lora_family} == {"lora", "dora", "dylora", "lora_fa", "qlora",
                                                               "lora8bit"}
    assert props["qlora"].merge_substitute("llm") == "lora" and props["dora"].merge_substitute("llm") == "dora"
    with pytest.raises(ModaltuneError, match="cannot be merged"):
        props["prefix_tuning"].merge_substitute("llm")


@pytest.fixture
def loha():
    """The worked example, imported (which registers ``method: loha``) and unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("peft_method_loha", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    peft_pkg.unregister_method("loha")


def test_the_worked_example_trains_saves_and_reloads(loha, tiny_llama, tmp_path):
    """LoHa from one module: applied to a tiny LLM, one step changes only its adapters, and the checkpoint (and the
    PEFT folder in it) reloads to the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from modaltune.shared import checkpoint as ckpt
    from modaltune.shared.lm import ModelConfig, build_text_model

    cfg = from_dict(ComponentConfig, {"method": "loha", "r": 4, "alpha": 8, "dropout": 0.0}, "llm")
    model, tok, _ = build_text_model(ModelConfig(name=str(tiny_llama)), cfg, compute_dtype=torch.float32,
                                     log_fn=lambda *_: None)
    trained = model.trained_names
    assert trained and all(".hada_" in n for n in trained)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, len(tok), (2, 12))}
    batch["labels"] = batch["input_ids"].clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch)["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained
    model.eval()
    with torch.no_grad():
        want = model.llm(input_ids=batch["input_ids"]).logits
    ckpt.save_checkpoint(model, tmp_path / "c", meta={"recipe": "test"})

    again, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), cfg, compute_dtype=torch.float32,
                                   log_fn=lambda *_: None)
    ckpt.load_trained(again, tmp_path / "c")
    again.eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                                           str(tmp_path / "c" / "adapter" / "llm")).eval()
    with torch.no_grad():
        assert torch.equal(again.llm(input_ids=batch["input_ids"]).logits, want)
        torch.testing.assert_close(peft_model(input_ids=batch["input_ids"]).logits, want)


def test_a_plugin_method_is_known_to_a_separate_cli_process(tmp_path):
    """A package that names the example module in its ``modaltune.plugins`` entry point: a new process that loads a
    config with ``llm.method=loha`` finds it (the registry loads plugins before it calls a name unknown)."""
    site = tmp_path / "site"
    (site / "loha_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "loha_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: loha-plugin\n"
                                                                  "Version: 0.1\n")
    (site / "loha_plugin-0.1.dist-info" / "entry_points.txt").write_text("[modaltune.plugins]\n"
                                                                         "loha = loha_plugin\n")
    (site / "loha_plugin.py").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    code = ("from modaltune.shared.config import field_docs, from_dict\n"
            "from modaltune.shared.peft import ComponentConfig, method_of\n"
            "cfg = from_dict(ComponentConfig, {'method': 'loha'}, 'llm')\n"  # nothing has loaded plugins before
            "print(method_of(cfg).name, 'loha' in field_docs(ComponentConfig)['method'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["loha", "True"]
    cli = subprocess.run([sys.executable, "-m", "modaltune", "config", "text-sft", "llm.method=loha"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode == 0 and "method: loha" in cli.stdout, cli.stderr[-2000:]
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # without the plugin: refused, naming the known ones
    cli = subprocess.run([sys.executable, "-m", "modaltune", "config", "text-sft", "llm.method=loha"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert cli.returncode != 0 and "unknown PEFT method 'loha'" in cli.stderr + cli.stdout
