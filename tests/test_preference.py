"""Preference optimisation: the shared DPO loss against trl's DPOTrainer, the reference being the model itself."""

from __future__ import annotations

import pytest
import torch


def _trl_trainer(tiny_llama, tmp_path, loss_type):
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    lm = peft.get_peft_model(lm, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "up_proj"]))
    pairs = [{"prompt": f"Expand the clinical abbreviation: {a}", "chosen": f" {c}", "rejected": f" {r}"}
             for a, c, r in [("BP", "blood pressure", "bowel prep"), ("HR", "heart rate", "hormone replacement"),
                             ("BID", "twice a day", "before bed"), ("PRN", "as needed", "every morning")]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, bf16=False, use_cpu=True,
                     report_to=[], beta=0.2, loss_type=[loss_type], max_steps=1)
    trainer = DPOTrainer(model=lm, args=args, train_dataset=datasets.Dataset.from_list(pairs), processing_class=tok)
    with torch.no_grad():  # the policy moves away from the reference trl keeps as a frozen copy ("ref")
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_shared_dpo_loss_equals_trls_on_the_same_pairs(tiny_llama, tmp_path, loss_type):
    from modaltune.shared.lm import CausalLMModel
    from modaltune.shared.preference import PreferenceConfig, preference_loss, reference_of, sequence_logps

    trainer = _trl_trainer(tiny_llama, tmp_path, loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
        model = CausalLMModel(trainer.model)  # modaltune's label-position loss on the same model and tokens
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)}
        policy = sequence_logps(model, inputs)
        with reference_of(model, adapter="ref"):
            reference = sequence_logps(model, inputs)
        assert not torch.allclose(policy, reference)  # the two really differ
        tokens = batch["completion_mask"].sum(dim=1).float()
        ours = preference_loss(*policy.chunk(2), *reference.chunk(2), PreferenceConfig(beta=0.2, loss_type=loss_type),
                               chosen_tokens=tokens.chunk(2)[0], rejected_tokens=tokens.chunk(2)[1])
    assert float(ours["loss"]) == pytest.approx(theirs, abs=1e-5)


def test_reference_is_the_model_with_its_adapters_off(tiny_llama):
    from modaltune.shared.errors import ConfigError
    from modaltune.shared.lm import ModelConfig, build_text_model
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.preference import reference_of, sequence_logps

    model, tok, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="lora", r=4),
                                     compute_dtype=torch.float32, log_fn=lambda *_: None)
    plain, _, _ = build_text_model(ModelConfig(name=str(tiny_llama)), ComponentConfig(method="full"),
                                   compute_dtype=torch.float32, log_fn=lambda *_: None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(ids < 60, -100)}
    model.eval(), plain.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        tuned = sequence_logps(model, batch)
        with reference_of(model):
            off = sequence_logps(model, batch)
        base = sequence_logps(plain, batch)
        # per-row sums agree with the mean loss the trainer uses
        mean = float(model(**batch)["loss"])
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    assert not torch.allclose(tuned, off)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # the context restores state
    counted = int((batch["labels"][:, 1:] != -100).sum())
    assert -float(tuned.sum()) / counted == pytest.approx(mean, rel=1e-5)
    with pytest.raises(ConfigError, match="no adapters"):
        with reference_of(plain):
            pass


def test_sft_weight_adds_the_chosen_tokens_mean_nll_and_bad_settings_are_refused():
    from modaltune.shared.errors import ConfigError
    from modaltune.shared.preference import PreferenceConfig, preference_loss

    pc, pr, rc, rr = (torch.tensor(v) for v in ([-4.0, -6.0], [-5.0, -9.0], [-4.5, -6.0], [-4.0, -8.0]))
    tokens = torch.tensor([2.0, 3.0])
    plain = preference_loss(pc, pr, rc, rr, PreferenceConfig(beta=0.1))
    mixed = preference_loss(pc, pr, rc, rr, PreferenceConfig(beta=0.1, sft_weight=0.5), chosen_tokens=tokens)
    assert float(mixed["loss"]) == pytest.approx(float(plain["loss"]) + 0.5 * 10.0 / 5.0)
    assert torch.equal(mixed["per_pair"], plain["per_pair"])
    with pytest.raises(ValueError, match="chosen_tokens"):
        preference_loss(pc, pr, rc, rr, PreferenceConfig(sft_weight=0.5))
    for bad in (PreferenceConfig(beta=0.0), PreferenceConfig(sft_weight=-1.0)):
        with pytest.raises(ConfigError):
            bad.validate("preference")
