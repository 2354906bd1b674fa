"""Adapter combination in weight space (`modaltune combine`): exact where the maths is, measured where not.

The expected outputs come from peft itself: each adapter merged into the base with ``merge_and_unload`` gives its
weight change, independently of the factor arithmetic under test.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from modaltune.shared.cli import main
from modaltune.shared.combine import Adapter, Factors, combine, combine_folders, read_adapter
from modaltune.shared.errors import ModaltuneError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _adapter(tmp_path, base_dir, name, *, seed, r=4, alpha=8.0, rslora=False, dora=False, targets=TARGETS):
    """A LoRA-family adapter with random (non-zero) factors, saved as a PEFT folder naming ``base_dir``."""
    import peft

    model = peft.get_peft_model(_base(base_dir), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, use_dora=dora, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    folder = tmp_path / name
    model.save_pretrained(str(folder))
    return folder


def _weights_of(base_dir, adapter_dir):
    """The base model's state dict after peft merges ``adapter_dir`` into it."""
    import peft

    merged = peft.PeftModel.from_pretrained(_base(base_dir), str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _expected_logits(base_dir, adapter_dirs, weights, ids):
    model = _base(base_dir)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target = {k: v.clone() for k, v in base.items()}
    for folder, w in zip(adapter_dirs, weights):
        for k, v in _weights_of(base_dir, folder).items():
            target[k] += w * (v - base[k])
    model.load_state_dict(target)
    with torch.no_grad():
        return model(ids).logits


def _logits(base_dir, adapter_dir, ids):
    import peft

    model = peft.PeftModel.from_pretrained(_base(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def _deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The weight change peft's own merge of ``adapter_dir`` makes, per base weight it touches (float64)."""
    base = _base(base_dir).state_dict()
    merged = _weights_of(base_dir, adapter_dir)
    return {k: (merged[k] - base[k]).double() for k in base if not torch.equal(merged[k], base[k])}


IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])


@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_one_adapter_at_weight_one_reproduces_it(tmp_path, tiny_llama, kind, how):
    one = _adapter(tmp_path, tiny_llama, "a", seed=1, rslora=kind == "rslora", dora=kind == "dora", r=8, alpha=4)
    combined = combine_folders([str(one)], tmp_path / "out", how=how, log=lambda m: None)
    want = _logits(tiny_llama, one, IDS)
    got = _logits(tiny_llama, tmp_path / "out", IDS)
    assert (got - want).abs().max() < 1e-5
    assert combined.report["relative_error"] < 1e-6
    assert combined.report["output"]["kind"] == ("dora" if kind == "dora" else "lora")
    with torch.no_grad():
        assert (want - _base(tiny_llama)(IDS).logits).abs().max() > 1e-2  # the adapter does change the outputs


@pytest.mark.parametrize("kinds", [("lora", "rslora"), ("dora", "lora"), ("dora", "dora")])
def test_cat_is_the_weighted_sum_of_weight_changes(tmp_path, tiny_llama, kinds):
    folders = [_adapter(tmp_path, tiny_llama, f"a{i}", seed=10 + i, r=4 + 2 * i, rslora=k == "rslora",
                        dora=k == "dora", targets=TARGETS if i == 0 else ["q_proj", "o_proj"])
               for i, k in enumerate(kinds)]
    weights = [0.7, -0.4]
    combined = combine_folders([str(f) for f in folders], tmp_path / "cat", weights=weights, how="cat",
                               log=lambda m: None)
    got = _logits(tiny_llama, tmp_path / "cat", IDS)
    want = _expected_logits(tiny_llama, folders, weights, IDS)
    assert (got - want).abs().max() < 1e-5
    assert combined.report["output"]["ranks"] == [4, 6, 10]  # q_proj holds both (4 + 6); v/down_proj a0, o_proj a1
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["use_dora"] == ("dora" in kinds)
    assert "o_proj" in " ".join(config["target_modules"]) and "down_proj" in " ".join(config["target_modules"])


def test_svd_linear_ties_and_dare_say_how_far_they_are_from_the_sum(tmp_path, tiny_llama):
    folders = [str(_adapter(tmp_path, tiny_llama, f"a{i}", seed=20 + i)) for i in range(2)]
    weights = [0.7, 0.3]
    want = _expected_logits(tiny_llama, folders, weights, IDS)
    errors = {}
    for how, extra in [("svd", {}), ("svd", {"rank": 8}), ("linear", {}), ("ties", {"density": 1.0}),
                       ("ties", {"density": 0.3}), ("dare", {"density": 0.5})]:
        out = tmp_path / f"{how}-{len(errors)}"
        rep = combine_folders(folders, out, weights=weights, how=how, log=lambda m: None, **extra).report
        got = _logits(tiny_llama, out, IDS)
        errors[(how, tuple(extra.items()))] = (rep, (got - want).abs().max().item())
    svd4, svd8 = errors[("svd", ())][0], errors[("svd", (("rank", 8),))][0]
    assert svd4["output"]["ranks"] == [4] and svd4["max_truncation_error"] > 0.01
    # what svd's adapter does to each weight: the best rank-4 approximation of the exact weighted sum of the
    # adapters' weight changes (Eckart-Young, from torch's SVD of that sum), and its reported error is that gap
    exact: dict[str, torch.Tensor] = {}
    for folder, w in zip(folders, weights):
        for k, d in _deltas(tiny_llama, folder).items():
            exact[k] = exact.get(k, 0) + w * d
    got = _deltas(tiny_llama, tmp_path / "svd-0")
    assert set(got) == set(exact) and len(exact) == 2 * len(TARGETS)  # q, v, down_proj in both layers
    for k, target in exact.items():
        u, sv, vh = torch.linalg.svd(target, full_matrices=False)
        best = (u[:, :4] * sv[:4]) @ vh[:4]  # (out, in)
        assert (got[k] - best).abs().max() < 1e-5 * target.abs().max(), k
        assert (got[k] - target).norm() > 0.01 * target.norm(), k  # rank 8 cut to 4: not the sum itself
    sq_err = sum(float(((got[k] - exact[k]) ** 2).sum()) for k in exact)
    sq_sum = sum(float((exact[k] ** 2).sum()) for k in exact)
    assert svd4["relative_error"] == pytest.approx((sq_err / sq_sum) ** 0.5, rel=1e-3)
    assert svd8["relative_error"] < 1e-6 and errors[("svd", (("rank", 8),))][1] < 1e-5  # rank 4 + 4: nothing cut
    assert errors[("linear", ())][0]["relative_error"] > 0.05  # cross terms B_i A_j
    # ties averages the entries whose signs agree (it does not add them): far from the sum even at density 1
    assert errors[("ties", (("density", 1.0),))][0]["relative_error"] > 0.05
    assert errors[("ties", (("density", 0.3),))][0]["max_truncation_error"] > 0  # a trimmed change is full rank
    again = combine_folders(folders, tmp_path / "dare-again", weights=weights, how="dare", density=0.5,
                            log=lambda m: None).report
    assert again["relative_error"] == errors[("dare", (("density", 0.5),))][0]["relative_error"]  # seeded


def _synthetic(deltas: list[torch.Tensor]) -> list[Adapter]:
    """Adapters whose single module's delta is exactly the given full-rank matrix (B = delta, A = identity)."""
    return [Adapter(f"t{i}", None, {"lora_alpha": d.shape[1], "r": d.shape[1]},
                    {"m": Factors(torch.eye(d.shape[1], dtype=torch.float64), d.double(), 1.0)})
            for i, d in enumerate(deltas)]


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    a = torch.tensor([[3.0, -1.0], [0.1, 2.0]])
    b = torch.tensor([[1.0, 2.0], [-4.0, 0.2]])
    out = combine(_synthetic([a, b]), [1.0, 1.0], "ties", density=0.5, rank=2)
    A, B = out.tensors["base_model.model.m.lora_A.weight"], out.tensors["base_model.model.m.lora_B.weight"]
    # kept: a -> {3, 2}, b -> {2, -4}; signs: +, +, -, +; entries agreeing with their sign averaged
    want = torch.tensor([[3.0, 2.0], [-4.0, 2.0]])
    assert torch.allclose(B.double() @ A.double(), want.double(), atol=1e-5)
    dare = combine(_synthetic([a, b]), [1.0, 1.0], "dare", density=1.0, rank=2)
    dB, dA = dare.tensors["base_model.model.m.lora_B.weight"], dare.tensors["base_model.model.m.lora_A.weight"]
    assert torch.allclose(dB.double() @ dA.double(), (a + b).double(), atol=1e-5)  # density 1: nothing dropped


def test_modaltune_checkpoints_combine_from_the_command_line(tmp_path, tiny_llama, sft_data, capsys):
    runs = []
    for i, lr in enumerate(["1e-2", "5e-3"]):
        out = tmp_path / f"run{i}"
        assert main(["run", "text-sft", "--out", str(out), f"model.name={tiny_llama}", f"data.source={sft_data}",
                     "train.max_steps=2", "train.batch_size=4", "train.save_steps=2", "eval.max_examples=2",
                     "eval.max_new_tokens=2", "train.precision=fp32", f"train.lr={lr}"]) == 0
        runs.append(out / "checkpoint")
    capsys.readouterr()
    code = main(["combine", "--adapter", str(runs[0]), "--adapter", f"{runs[1]}:llm", "--weight", "0.5",
                 "--weight", "0.5", "--out", str(tmp_path / "both")])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "both")
    report = json.loads((tmp_path / "both" / "combine.json").read_text())
    assert report["how"] == "cat" and report["relative_error"] < 1e-6 and report["output"]["ranks"] == [32]
    assert (tmp_path / "both" / "combine.md").read_text().startswith("# Adapter combination: cat")
    folders = [r / "adapter" / "llm" for r in runs]
    want = _expected_logits(tiny_llama, folders, [0.5, 0.5], IDS)
    assert (_logits(tiny_llama, tmp_path / "both", IDS) - want).abs().max() < 1e-5
    # refusals name the item and the fix
    assert main(["combine", "--adapter", str(runs[0]), "--out", str(tmp_path / "both")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["combine", "--adapter", f"{runs[0]}:vision", "--out", str(tmp_path / "x")]) == 2
    assert "['llm']" in capsys.readouterr().err
    assert main(["combine", "--adapter", str(runs[0]), "--adapter", str(runs[1]), "--weight", "1", "--weight", "2",
                 "--weight", "3", "--out", str(tmp_path / "y")]) == 2
    assert "--weight" in capsys.readouterr().err


def test_adapters_combine_refuses(tmp_path, tiny_llama):
    import peft

    ia3 = peft.get_peft_model(_base(tiny_llama), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ModaltuneError, match="IA3"):
        read_adapter(tmp_path / "ia3")
    with pytest.raises(ModaltuneError, match="neither a PEFT adapter folder"):
        read_adapter(tmp_path)
    a = _adapter(tmp_path, tiny_llama, "r4", seed=1, r=4)
    b = _adapter(tmp_path, tiny_llama, "r6", seed=2, r=6)
    with pytest.raises(ModaltuneError, match="equal ranks"):
        combine_folders([str(a), str(b)], tmp_path / "lin", how="linear", log=lambda m: None)
    assert not (tmp_path / "lin").exists()
    d = _adapter(tmp_path, tiny_llama, "dora", seed=3, dora=True)
    config = json.loads((d / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (d / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModaltuneError, match="--base"):
        combine_folders([str(d)], tmp_path / "nob", log=lambda m: None)
    combine_folders([str(d)], tmp_path / "withbase", base=str(tiny_llama), log=lambda m: None)
    assert json.loads((tmp_path / "withbase" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(tiny_llama)


def test_large_matrices_use_a_randomised_svd_with_the_exact_error():
    from modaltune.shared.combine import _dense_svd

    g = torch.Generator().manual_seed(0)
    m = torch.randn(1100, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 1050, generator=g,
                                                                               dtype=torch.float64)
    m += 0.01 * torch.randn(1100, 1050, generator=g, dtype=torch.float64)
    B, A, k, error = _dense_svd(m, 12)
    s = torch.linalg.svdvals(m)
    best = float((s[12:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert k == 12 and error == pytest.approx(best, rel=1e-6)
    assert float(torch.linalg.norm(m - B @ A) / torch.linalg.norm(m)) == pytest.approx(best, rel=1e-3)


def test_damaged_or_mismatched_adapters_are_refused_by_name(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    def edit(folder, config=None, tensors=None):
        if config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        if tensors:
            t = load_file(str(folder / "adapter_model.safetensors"))
            save_file(tensors(t), str(folder / "adapter_model.safetensors"))
        return str(folder)

    a = _adapter(tmp_path, tiny_llama, "a", seed=1)
    key = next(k for k in load_file(str(a / "adapter_model.safetensors")) if ".lora_A." in k)
    cases = [
        (edit(_adapter(tmp_path, tiny_llama, "loftq", seed=2), {"init_lora_weights": "loftq"}), "changes the base"),
        (edit(_adapter(tmp_path, tiny_llama, "bias", seed=3), {"bias": "all"},
              lambda t: {**t, key.replace("lora_A.weight", "base_layer.bias"): torch.zeros(4)}), "bias='none'"),
        (edit(_adapter(tmp_path, tiny_llama, "conv", seed=4),
              tensors=lambda t: {**t, key: t[key][:, :, None, None]}), "convolution LoRA"),
        (edit(_adapter(tmp_path, tiny_llama, "cut", seed=5),
              tensors=lambda t: {**t, key: t[key][:2]}), "do not fit together"),
    ]
    for folder, message in cases:
        with pytest.raises(ModaltuneError, match=re.escape(message)):
            combine_folders([folder], tmp_path / "never", log=lambda m: None)
    wide = edit(_adapter(tmp_path, tiny_llama, "wide", seed=6), tensors=lambda t: {
        k: (torch.cat([v, v], dim=1) if k == key else v) for k, v in t.items()})
    with pytest.raises(ModaltuneError, match="different shapes"):
        combine_folders([str(a), wide], tmp_path / "never", log=lambda m: None)
    fan = edit(_adapter(tmp_path, tiny_llama, "fan", seed=7), {"fan_in_fan_out": True})
    with pytest.raises(ModaltuneError, match="fan_in_fan_out"):
        combine_folders([str(a), fan], tmp_path / "never", log=lambda m: None)
    assert not (tmp_path / "never").exists()
    # a result is an ordinary folder (not mkdtemp's owner-only one)
    combine_folders([str(a)], tmp_path / "ok", log=lambda m: None)
    assert (tmp_path / "ok").stat().st_mode & 0o077 == 0o777 & ~_umask() & 0o077


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_base_weights_are_found_when_the_names_differ_by_a_leading_part(tmp_path, tiny_llama):
    from safetensors.torch import load_file, save_file

    from modaltune.shared.combine import BaseWeights

    inner = tmp_path / "inner"  # the weights stored under the inner model's names ("layers.0...", no "model.")
    inner.mkdir()
    weights = load_file(str(next(tiny_llama.glob("*.safetensors"))))
    save_file({k.removeprefix("model."): v for k, v in weights.items()}, str(inner / "model.safetensors"))
    base = BaseWeights(str(inner), log=lambda m: None)
    want = weights["model.layers.1.self_attn.q_proj.weight"].double()
    assert torch.equal(base.weight("model.layers.1.self_attn.q_proj"), want)
    with pytest.raises(ModaltuneError, match="no unambiguous weight"):
        base.weight("model.layers.1.self_attn.nothing")
