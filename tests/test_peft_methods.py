"""Every PEFT method trains a step and changes only what it should."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modaltune.shared.errors import ConfigError
from modaltune.shared.peft import ComponentConfig
from modaltune.shared.lm import ModelConfig, build_text_model

METHODS = ["lora", "dora", "qlora", "lora8bit", "ia3", "prompt_tuning", "prefix_tuning", "full"]
# which parameter names each method may change (substring test)
ALLOWED = {
    "lora": ("lora_",),
    "dora": ("lora_",),  # lora_A/B and lora_magnitude_vector
    "qlora": ("lora_",),
    "lora8bit": ("lora_",),
    "ia3": ("ia3_",),
    "prompt_tuning": ("prompt_encoder",),
    "prefix_tuning": ("prompt_encoder",),
    "full": ("",),
}


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_one_step_and_changes_only_its_weights(method, tiny_llama):
    model, tok, _ = build_text_model(
        ModelConfig(name=str(tiny_llama)), ComponentConfig(method=method, r=4, alpha=8, num_virtual_tokens=4),
        compute_dtype=torch.float32,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = model.trained_names
    assert trained, "the method made nothing trainable"
    assert all(any(k in n for k in ALLOWED[method]) for n in trained), sorted(trained)[:5]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(**_batch(len(tok)))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed, "one optimizer step changed nothing"
    assert changed <= trained, sorted(changed - trained)[:5]
    frozen_same = all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n not in trained)
    assert frozen_same
    report = model.parameter_report()
    assert 0 < report["llm"]["trainable"] <= report["llm"]["total"]
    if method != "full":
        assert report["llm"]["trainable"] < report["llm"]["total"] / 2


def test_qlora_quantises_the_body_but_not_the_head(tiny_llama):
    model, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="qlora", r=4),
                                   compute_dtype=torch.float32)
    base = model.llm.get_base_model()
    kinds = {type(m).__name__ for n, m in base.named_modules() if n.endswith("q_proj.base_layer")}
    assert kinds == {"Linear4bit"}
    assert type(base.lm_head).__name__ == "Linear"


def test_target_matching_nothing_lists_nearby_names(tiny_llama):
    with pytest.raises(ConfigError) as err:
        build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", targets=["q_prj"]),
                         compute_dtype=torch.float32)
    msg = str(err.value)
    assert "'q_prj'" in msg and "q_proj" in msg


def test_glob_targets_are_scoped(tiny_llama):
    model, _, _ = build_text_model(
        ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", r=2, targets=["layers.1.mlp.*"]),
        compute_dtype=torch.float32,
    )
    names = {n for n in model.trained_names}
    assert names and all(".layers.1.mlp." in n for n in names)


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_layers_narrow_a_method_to_those_blocks(method, tiny_llama):
    cfg = ComponentConfig(method=method, r=2, targets=["q_proj", "down_proj"], feedforward=["down_proj"], layers=[-1])
    model, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), cfg, compute_dtype=torch.float32)
    names = model.trained_names
    assert names and all(".layers.1." in n for n in names), sorted(names)
    if method == "full":  # every weight of the block, nothing outside it (not the embeddings, not the head)
        assert any("input_layernorm" in n for n in names) and not any("embed" in n or "lm_head" in n for n in names)


def test_layers_out_of_range_or_on_prompt_methods_are_refused(tiny_llama):
    with pytest.raises(ConfigError, match="block -3 does not exist; the component has 2 blocks"):
        build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", layers=[-3]),
                         compute_dtype=torch.float32)
    with pytest.raises(ConfigError, match="layers does not apply to prompt_tuning"):
        ComponentConfig(method="prompt_tuning", layers=[0]).validate("llm")


def test_frozen_llm_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="nothing would train"):
        build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="frozen"),
                         compute_dtype=torch.float32)


def test_dora_and_lora_differ(tiny_llama):
    cfg = ComponentConfig(method="lora", r=4)
    lora, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), cfg, compute_dtype=torch.float32)
    dora, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), dataclasses.replace(cfg, method="dora"),
                                  compute_dtype=torch.float32)
    assert not any("magnitude" in n for n in lora.trained_names)
    assert any("magnitude" in n for n in dora.trained_names)


def _four_block_gemma(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "g4"))
    return tmp_path / "g4"


def test_half_fine_tuning_follows_the_hft_selection_rule(tmp_path, tiny_llama):
    """Per block: 2 of the 4 attention matrices (one of q/o, one of k/v: half the parameters under grouped-query
    attention), 2 of 3 FFN matrices in half the blocks and 1 in the others, 1 of 2 block norms; embeddings and head
    frozen; about half of all block parameters."""
    import random

    from transformers import AutoModelForCausalLM

    from modaltune.shared.peft import ComponentSpec, apply_peft, draw_half, half_selection

    folder = _four_block_gemma(tmp_path)
    lm = apply_peft(AutoModelForCausalLM.from_pretrained(str(folder)),
                    [ComponentSpec("llm", "", ComponentConfig(method="hft"))])
    blocks = list(range(4))
    names, summary = draw_half(lm, "model.layers", blocks, "42:sft:llm")
    assert summary["block_fraction"] == pytest.approx(0.5, abs=0.01)
    assert not [n for n in names if "embed" in n or "lm_head" in n or not n.startswith("model.layers.")]
    ffn_counts = []
    for i in blocks:
        mine = {n.split(f"model.layers.{i}.", 1)[1].rsplit(".", 1)[0] for n in names if n.startswith(f"model.layers.{i}.")}
        attn = {m.split(".")[-1] for m in mine if m.startswith("self_attn.") and m.endswith("proj")}
        assert len(attn) == 2 and len(attn & {"q_proj", "o_proj"}) == 1 and len(attn & {"k_proj", "v_proj"}) == 1
        ffn_counts.append(len([m for m in mine if m.startswith("mlp.")]))
        block_norms = {m for m in mine if m.endswith("layernorm")}
        assert len(block_norms) == 2  # gemma-3 blocks have 4 norms: half of them
        assert len({m for m in mine if m.endswith(("q_norm", "k_norm"))}) == 1
    assert sorted(ffn_counts) == [1, 1, 2, 2]
    again, _ = draw_half(lm, "model.layers", blocks, "42:sft:llm")
    other, _ = draw_half(lm, "model.layers", blocks, "42:dpo:llm")
    assert again == names and other != names  # seeded: the same stage draws the same half, another stage redraws
    # llama blocks (2 norms): 1 of 2
    picked = half_selection(AutoModelForCausalLM.from_pretrained(str(tiny_llama)).model.layers[0], random.Random(0),
                            True)
    assert len(picked["norm"]) == 1 and len(picked["feed_forward"]) == 2 and len(picked["attention"]) == 2


def test_half_fine_tuning_trains_the_drawn_half_each_stage(tiny_llama):
    model, tok, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="hft"),
                                     compute_dtype=torch.float32, log_fn=lambda *_: None)
    trained = model.trained_names
    assert trained and all(".layers." in n for n in trained)  # every block weight is kept by checkpoints
    first = model.set_stage_trainable(None, draw="42:one")
    on_first = {n for n, p in model.named_parameters() if p.requires_grad}
    assert first["llm"]["block_fraction"] == pytest.approx(0.5, abs=0.02) and on_first < trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_batch(len(tok)))["loss"].backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= on_first
    model.set_stage_trainable(None, draw="42:two")
    on_second = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on_second != on_first and on_second < trained
