"""The composed model as a transformers model: save_pretrained / from_pretrained round trips (image and speech
encoders, fp32 and bf16), AutoModel after importing modaltune's compose package, and folders in the format earlier
versions wrote (composition.json) still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modaltune.shared.compose import (ComposedConfig, ComposedLM, EncoderConfig, ProjectorConfig, anchor_on_text,
                                      build_composed_lm, load_legacy_composition, save_merged)
from modaltune.shared.lm import ModelConfig
from modaltune.shared.peft import ComponentConfig

QUIET = {"log": lambda *_: None}
PROMPT = "[INST] <x><Here></x> describe [/INST]"


def _build(encoder: EncoderConfig, llm_folder, projector: ProjectorConfig, method: str = "lora"):
    torch.manual_seed(0)
    return build_composed_lm(encoder=encoder, encoder_tuning=ComponentConfig(method="frozen"),
                             model=ModelConfig(name=str(llm_folder)), llm=ComponentConfig(method=method, r=4, alpha=8),
                             projector=projector, **QUIET)


def _perturb(model) -> None:
    """Trained-looking weights: LoRA B and the projector away from their initial values (else a merge is a no-op)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _image_inputs(model, tok):
    ids = tok("hello <pad> red circle", add_special_tokens=False)["input_ids"]
    pixels = torch.randn(2, 3, *model.encoder.data_cfg["input_size"][1:], generator=torch.Generator().manual_seed(2))
    return _batch(tok, ids), {"encoder_inputs": pixels}


def _speech_inputs(model, tok):
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 20000)]
    lengths = torch.tensor([model.encoder.token_count(w) for w in waves])
    ids = tok("say <pad> aspirin daily", add_special_tokens=False)["input_ids"]
    return _batch(tok, ids), {"encoder_inputs": model.encoder.preprocess(waves), "features_lengths": lengths}


def _batch(tok, ids):
    pos = ids.index(tok.pad_token_id)
    return {"input_ids": torch.tensor([ids, ids]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long),
            "placeholder_positions": torch.tensor([pos, pos]), "labels": torch.tensor([ids, ids])}


def _outputs(model, prompt, encoded):
    model.eval()
    with torch.no_grad():
        loss = model(**prompt, **encoded)["loss"]
        embeds, mask, _ = model.embed(prompt["input_ids"], prompt["attention_mask"], prompt["placeholder_positions"],
                                      **encoded)
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits
    return loss, logits


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_image_model_round_trips_through_save_and_from_pretrained(tiny_llama, tmp_path, dtype):
    from transformers import AutoModel, AutoTokenizer

    model, tok, _ = _build(EncoderConfig(kind="timm", name="test_efficientnet"), tiny_llama,
                           ProjectorConfig(norm="both", anchor_words=16))
    anchor_on_text(model, tok, ["a red circle", "a blue square"], 16, **QUIET)
    _perturb(model)
    prompt, encoded = _image_inputs(model, tok)
    want = _outputs(model, prompt, encoded)
    out = save_merged(model, tok, tmp_path / "merged", template="{question}", placeholder="<ImageHere>", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["model_type"] == "modaltune_composed"
    again = AutoModel.from_pretrained(str(out))
    assert type(again) is ComposedLM and again.config.template == "{question}"
    assert again.config.placeholder == "<ImageHere>"
    assert AutoTokenizer.from_pretrained(str(out)).pad_token_id == tok.pad_token_id
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in ComposedLM(again.config).named_parameters()]
    if dtype is None:
        got = _outputs(again, prompt, encoded)
        assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-4)
    else:  # every part in bf16, as saved; the same outputs as the merged model cast to bf16
        assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
        encoded = {"encoder_inputs": encoded["encoder_inputs"].to(torch.bfloat16)}
        reference = _outputs(ComposedLM.from_pretrained(str(out), dtype=torch.bfloat16), prompt, encoded)
        got = _outputs(again, prompt, encoded)
        assert torch.equal(got[1], reference[1])
        assert torch.allclose(got[1].float(), want[1], atol=0.1)


def test_speech_model_round_trips_with_its_word_reader(tiny_whisper, tiny_gemma, tmp_path):
    model, tok, _ = _build(EncoderConfig(kind="whisper", name=str(tiny_whisper)), tiny_gemma,
                           ProjectorConfig(kind="swiglu", group=8, norm="words", anchor_words=16, word_grounding=1.0,
                                           grounding="ctc", collapse=True))
    anchor_on_text(model, tok, ["take aspirin daily", "hold heparin today"], 16, **QUIET)
    _perturb(model)
    prompt, encoded = _speech_inputs(model, tok)
    want = _outputs(model, prompt, encoded)
    again = ComposedLM.from_pretrained(str(save_merged(model, tok, tmp_path / "m", template="{instruction}")))
    got = _outputs(again, prompt, encoded)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-4)
    assert again.projector.word_ids.tolist() == [-1] * 16  # anchor ids are not saved (as in a checkpoint)
    assert torch.equal(again.projector.words, model.projector.words)
    with pytest.raises(Exception, match="no encoder architecture"):
        ComposedLM(ComposedConfig(encoder={"kind": "whisper"}, projector={}))


def test_a_folder_in_the_earlier_composition_format_still_loads(tiny_llama, tmp_path):
    """What `modaltune merge` of a composed recipe wrote before (composition.json, llm/, projector.safetensors)
    loads with the same outputs, and converts to a from_pretrained folder."""
    from safetensors.torch import save_file

    projector = ProjectorConfig(norm="rms", group=2)
    model, tok, _ = _build(EncoderConfig(kind="timm", name="test_efficientnet"), tiny_llama, projector)
    _perturb(model)
    prompt, encoded = _image_inputs(model, tok)
    want = _outputs(model, prompt, encoded)
    old = tmp_path / "old"
    lm = model.llm.merge_and_unload()
    lm.save_pretrained(str(old / "llm"))
    tok.save_pretrained(str(old / "llm"))
    save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(old / "projector.safetensors"))
    composition = {"encoder": {"kind": "timm", "name": "test_efficientnet", "weights": None, "pretrained": False,
                               "layer": None, "image_size": None},
                   "projector": {**{f: getattr(projector, f) for f in ("kind", "group", "group_mode", "lr", "norm",
                                                                        "anchor_words", "word_grounding", "grounding",
                                                                        "collapse")},
                                 "words": "soft", "word_dropout": 0.0},
                   "template": "{question}"}
    (old / "composition.json").write_text(json.dumps(composition))
    torch.manual_seed(0)  # a frozen encoder is rebuilt from its own weights: here timm's random ones, as in _build
    loaded, tok2 = load_legacy_composition(old, **QUIET)
    assert loaded.config.template == "{question}" and tok2.pad_token_id == tok.pad_token_id
    got = _outputs(loaded, prompt, encoded)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-4)
    new = ComposedLM.from_pretrained(str(save_merged(loaded, tok2, tmp_path / "new", template="{question}")))
    assert torch.allclose(_outputs(new, prompt, encoded)[1], want[1], atol=1e-4)
    composition["projector"]["words"] = "hard"
    (old / "composition.json").write_text(json.dumps(composition))
    with pytest.raises(Exception, match="projector.words is no longer supported"):
        load_legacy_composition(old, **QUIET)
