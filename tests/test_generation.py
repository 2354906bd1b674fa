"""The one generation path (``modaltune.shared.generation``): decoding settings, answers in item order for causal
LMs, composed models and Whisper, and no library notice in a run's log from a decode."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings

import numpy as np
import pytest
import torch

from modaltune.shared.config import ConfigError, from_dict
from modaltune.shared.generation import DecodingConfig, TokenPrompts, generate


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _notices():
    """Every transformers log record at WARNING or above and every Python warning given inside, as text."""
    logging.Logger.warning_once.cache_clear()  # a notice an earlier test gave once is given again
    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    seen: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen += handler.messages + [str(w.message) for w in caught]
    finally:
        logger.removeHandler(handler)


def _perturbed(model, scale: float, seed: int = 0):
    """Non-zero adapters, so answers differ between inputs (a fresh LoRA's output is the base model's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _text_model(folder):
    from modaltune.shared.lm import ModelConfig, build_text_model
    from modaltune.shared.peft import ComponentConfig

    torch.manual_seed(0)
    model, tok, _ = build_text_model(ModelConfig(name=str(folder)), ComponentConfig(method="lora", r=4, alpha=8),
                                     compute_dtype=torch.float32, log_fn=lambda *_: None)
    return _perturbed(model, 0.3), tok


def test_decoding_config_checks_its_values_and_makes_a_greedy_generation_config():
    cfg = DecodingConfig(max_new_tokens=7, num_beams=3, no_repeat_ngram=2)
    made = cfg.generation_config(pad_token_id=0, eos_token_id=1)
    assert (made.max_new_tokens, made.num_beams, made.no_repeat_ngram_size, made.do_sample) == (7, 3, 2, False)
    assert (made.pad_token_id, made.eos_token_id) == (0, 1)
    assert DecodingConfig().generation_config().pad_token_id is None  # unset: the model's own
    for bad, match in (({"num_beams": 0}, "num_beams must be 1"), ({"no_repeat_ngram": -1}, "no_repeat_ngram must"),
                       ({"batch_size": 0}, "batch_size and d.max_new_tokens")):
        with pytest.raises(ConfigError, match=match):
            from_dict(DecodingConfig, bad, "d")


def test_text_answers_come_back_in_item_order_whatever_the_batching(tiny_llama):
    model, tok = _text_model(tiny_llama)
    texts = ["fever", "Take the tablet twice a day with food", "The patient reports", "What is the dose"]
    prompts = [tok(t)["input_ids"] for t in texts]
    cfg = DecodingConfig(max_new_tokens=6)
    batched = generate(model, tok, TokenPrompts(prompts, tok), dataclasses.replace(cfg, batch_size=3), precision="fp32")
    alone = [generate(model, tok, TokenPrompts([p], tok), cfg, precision="fp32")[0] for p in prompts]
    assert batched == alone  # left padding with its mask answers as each prompt alone, in the order given
    assert len(set(alone)) > 1  # the prompts are answered differently: the order is tested
    spied = []
    real = model.generate
    model.generate = lambda **kw: spied.append(kw) or real(**kw)
    generate(model, tok, TokenPrompts(prompts[:2], tok), DecodingConfig(max_new_tokens=3, no_repeat_ngram=2),
             precision="fp32")
    (call,) = spied  # one batch: ids, their mask and one GenerationConfig, nothing else
    assert set(call) == {"input_ids", "attention_mask", "generation_config"}
    assert call["attention_mask"].tolist()[0][0] == 0 and call["generation_config"].no_repeat_ngram_size == 2


def test_a_causal_lm_with_sampling_defaults_decodes_greedily_without_notices(tiny_llama):
    model, tok = _text_model(tiny_llama)
    model.llm.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=20)  # an instruct model's
    prompts = [tok(t)["input_ids"] for t in ("fever", "Take the tablet twice a day", "What is")]
    with _notices() as seen:
        first = generate(model, tok, TokenPrompts(prompts, tok), DecodingConfig(max_new_tokens=5, batch_size=3),
                         precision="fp32")
    assert seen == []
    again = generate(model, tok, TokenPrompts(prompts, tok), DecodingConfig(max_new_tokens=5, batch_size=3),
                     precision="fp32")
    assert first == again  # greedy: the model's sampling defaults are not used


def test_a_composed_decode_with_no_repeat_ngram_gives_no_notice(tiny_whisper, tiny_llama):
    from modaltune.audio.tasks import AUDIO_PLACEHOLDER
    from modaltune.shared.compose import EncoderConfig, ProjectorConfig, build_composed_lm
    from modaltune.shared.compose_data import ComposedDataset, ComposedPrompts
    from modaltune.shared.lm import ModelConfig
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.skips import Skips

    torch.manual_seed(0)
    model, tok, _ = build_composed_lm(
        encoder=EncoderConfig(kind="whisper", name=str(tiny_whisper)),
        encoder_tuning=ComponentConfig(method="frozen"), model=ModelConfig(name=str(tiny_llama)),
        llm=ComponentConfig(method="lora", r=4, alpha=8), projector=ProjectorConfig(group=8, norm="rms"),
        log=lambda *_: None)
    rng = np.random.default_rng(0)
    waves = {f"clip{i}": (0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for i, s in enumerate((0.5, 1.3))}
    rows = [{"id": k, "input": k, "prompt": f"{AUDIO_PLACEHOLDER} say:", "target": "x"} for k in waves]
    ds = ComposedDataset(rows, tok, None, placeholder=AUDIO_PLACEHOLDER, max_length=64, skipped=Skips())
    inputs = ComposedPrompts(ds, tok, encoder=model.encoder, load=waves.__getitem__)
    with _notices() as control, torch.no_grad(), inputs.batch([0, 1], model.device) as batch:
        model.generate(**batch, max_new_tokens=4, no_repeat_ngram_size=2, do_sample=False)
    assert any("no_repeat_ngram_size" in m for m in control)  # the stock call is noticed: the capture works
    with _notices() as seen:
        generate(model, tok, inputs, DecodingConfig(max_new_tokens=4, batch_size=2, no_repeat_ngram=2),
                 precision="fp32")
    assert seen == []


def test_whisper_decodes_without_the_attention_mask_and_generation_config_notices(tiny_whisper):
    from modaltune.audio.eval import ASREvalConfig, transcribe
    from modaltune.audio.features import log_mel
    from modaltune.audio.whisper import WhisperModelConfig, build_whisper, whisper_components
    from modaltune.shared.features import FeatureCache

    parts = {name: dataclasses.replace(c, r=4) for name, c in whisper_components().items()}  # frozen encoder, LoRA
    torch.manual_seed(0)
    model, processor, _ = build_whisper(WhisperModelConfig(name=str(tiny_whisper)), parts, compute_dtype=torch.float32)
    with torch.no_grad():  # non-zero adapters: the clips decode differently
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rng = np.random.default_rng(1)
    waves = [0.1 * rng.standard_normal(16000 * (i + 1)).astype(np.float32) for i in range(3)]
    model.eval()
    with _notices() as control, torch.no_grad():  # how the decode was called before: its notices are captured
        stock = model.whisper.generate(input_features=log_mel(processor, waves), max_new_tokens=8, do_sample=False)
    assert any("attention mask is not set" in m for m in control)
    assert any("Passing `generation_config` together" in m for m in control)
    cache = FeatureCache(model, depth=model.cache_depth())
    for beams in (1, 2):
        cfg = ASREvalConfig(max_new_tokens=8, num_beams=beams, batch_size=3)
        with _notices() as seen:
            plain, _ = transcribe(model, processor, waves, cfg, precision="fp32", language=None, task=None)
            transcribe(model, processor, waves, cfg, precision="fp32", language=None, task=None, cache=cache)
        assert seen == [], beams
        if beams == 1:  # the mask and the GenerationConfig change no token
            assert plain == [t.strip() for t in processor.batch_decode(stock, skip_special_tokens=True)]
