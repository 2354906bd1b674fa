"""The modality-neutral core: one feature cache, one composition path (images and speech alike), one harness."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from modaltune.shared.features import FeatureCache, content_key


class _ToyEncoder(nn.Module):
    """Two linear 'blocks' over (B, 3, 4) inputs; a CachedEncoder whose preprocessing scales by ``gain``."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.gain = gain
        self.out_dim = 4
        self.calls = 0

    @property
    def preprocessing_key(self) -> str:
        return f"toy:{self.gain}"

    @property
    def output_depth(self) -> int:
        return 2

    def preprocess(self, inputs):
        return torch.stack([torch.as_tensor(np.asarray(x), dtype=torch.float32) * self.gain for x in inputs])

    def cache_depth(self):
        return 2

    def cached_weights(self, depth):
        return [(n, p) for n, p in self.named_parameters() if int(n.split(".")[1]) < depth]

    def encode_prefix(self, x, depth):
        self.calls += len(x)
        for block in self.blocks[:depth]:
            x = block(x)
        return x

    def encode_rest(self, states, depth):
        for block in self.blocks[depth:]:
            states = block(states)
        return states

    def forward(self, x):
        return self.encode_rest(self.encode_prefix(x, 0), 0)


def _clips(n=3):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(n)]


def test_cache_keys_by_content_encodes_each_input_once_and_persists(tmp_path):
    torch.manual_seed(0)
    enc = _ToyEncoder()
    clips = _clips()
    cache = FeatureCache(enc, directory=tmp_path)
    keys = cache.fill(clips + [clips[0].copy()])  # the same content twice: encoded once
    assert keys[0] == keys[3] and enc.calls == 3 and cache.computed == 3
    expected = enc(torch.as_tensor(np.stack(clips)))
    assert torch.allclose(cache.encoder_output(keys[:3]), expected, atol=1e-6)
    again = FeatureCache(enc, directory=tmp_path)
    again.fill(clips)
    assert again.loaded == 3 and again.computed == 0  # from disk
    other = FeatureCache(_ToyEncoder(gain=2.0), directory=tmp_path)  # other preprocessing: never reused
    other.fill(clips)
    assert other.computed == 3 and other.fingerprint != cache.fingerprint


def test_partial_cache_runs_only_the_blocks_above_its_depth():
    torch.manual_seed(0)
    enc = _ToyEncoder()
    clips = _clips()
    cache = FeatureCache(enc, depth=1)
    keys = cache.fill(clips)
    assert not cache.complete and cache.batch_fields() == {"features_depth": 1}
    full = enc(torch.as_tensor(np.stack(clips)))
    assert torch.allclose(cache.encoder_output(keys), full, atol=1e-6)
    with torch.no_grad():  # the block above the depth trains: the cached states stay valid ...
        enc.blocks[1].weight.add_(1.0)
    assert FeatureCache(enc, depth=1).fingerprint == cache.fingerprint
    with torch.no_grad():  # ... a change below it does not
        enc.blocks[0].weight.add_(1.0)
    assert FeatureCache(enc, depth=1).fingerprint != cache.fingerprint


def test_content_key_reads_files_by_content(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert content_key(a) == content_key(str(b)) != content_key(np.zeros(2))


def test_whisper_encoder_composes_with_a_lora_llm_like_an_image_encoder(tiny_whisper, tiny_llama):
    """The second modality through the same core: Whisper's encoder (registered as ``whisper``) -> grouping ->
    projector -> LoRA LLM; cached and uncached speech give the same loss, and one step trains projector and LoRA."""
    from modaltune.shared.compose import EncoderConfig, ProjectorConfig, build_composed_lm
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset
    from modaltune.shared.lm import ModelConfig
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.skips import Skips

    torch.manual_seed(0)
    model, tok, _ = build_composed_lm(
        encoder=EncoderConfig(kind="whisper", name=str(tiny_whisper)), encoder_tuning=ComponentConfig(method="frozen"), model=ModelConfig(name=str(tiny_llama)),
        llm=ComponentConfig(method="lora", r=4, alpha=8), projector=ProjectorConfig(group=8, norm="rms"),
        log=lambda *_: None)
    assert model.encoder.cache_depth() == model.encoder.output_depth  # frozen: the output is cached
    waves = {f"clip{i}": 0.1 * np.random.default_rng(i).standard_normal(8000).astype(np.float32) for i in range(3)}
    rows = [{"id": k, "input": k, "prompt": "<AudioHere> transcribe:", "target": f"word {i}"}
            for i, k in enumerate(waves)]
    cache = FeatureCache(model.encoder, load=waves.__getitem__)
    cache.fill(list(waves))
    cached = ComposedDataset(rows, tok, cache, placeholder="<AudioHere>", max_length=64, skipped=Skips())
    plain = ComposedDataset(rows, tok, None, placeholder="<AudioHere>", max_length=64, skipped=Skips())
    a_batch = ComposedCollator(tok.pad_token_id)([cached[i] for i in range(3)])
    b_batch = ComposedCollator(tok.pad_token_id, model.encoder, load=waves.__getitem__)([plain[i] for i in range(3)])
    frames = 8000 // 320  # 0.5 s at 50 frames/s: only the clip's own of the 30 s window's 1500
    assert a_batch["features"].shape == (3, frames, model.encoder.out_dim) and "encoder_inputs" in b_batch
    model.eval()
    with torch.no_grad():
        a, b = model(**a_batch)["loss"], model(**b_batch)["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**a_batch)["loss"].backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {model.component_of(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"projector", "llm"}


def test_measure_before_is_kept_for_a_resumed_run(tmp_path):
    from modaltune.shared.harness import measure_before

    calls = []

    def measure():
        calls.append(1)
        return {"m": float(len(calls))}, [{"id": 1}]

    assert measure_before(tmp_path, False, measure) == ({"m": 1.0}, [{"id": 1}])
    assert measure_before(tmp_path, True, measure) == ({"m": 1.0}, [{"id": 1}])  # read back, not measured
    assert measure_before(tmp_path, False, measure)[0] == {"m": 2.0} and len(calls) == 2


def test_merge_config_unquantises_and_refuses_virtual_tokens():
    from modaltune.shared.errors import ModaltuneError
    from modaltune.shared.merge import merge_config
    from modaltune.shared.peft import ComponentConfig
    from modaltune.shared.training import TrainConfig

    @dataclasses.dataclass
    class Cfg:
        llm: ComponentConfig
        encoder: ComponentConfig
        train: TrainConfig

    cfg = Cfg(ComponentConfig(method="qlora"), ComponentConfig(method="frozen"),
              TrainConfig(precision="bf16", gradient_checkpointing=True))
    out = merge_config(cfg)
    assert (out.llm.method, out.encoder.method) == ("lora", "frozen")
    assert (out.train.precision, out.train.gradient_checkpointing) == ("fp32", False)
    with pytest.raises(ModaltuneError, match="virtual tokens"):
        merge_config(dataclasses.replace(cfg, llm=ComponentConfig(method="prompt_tuning")))


def test_caps_are_reported_apart_from_skips():
    from modaltune.shared.harness import data_line
    from modaltune.shared.skips import Skips

    s = Skips()
    s.add("missing image", "a.png")
    s.cap("max_train_questions=10", 90)
    summary = s.summary(10)
    assert (summary["skipped"], summary["capped"]) == (1, 90)
    assert data_line({"train": summary}) == "data: train 10 kept / 1 skipped (90 left out by size caps)"


def test_named_inputs_are_keyed_by_what_they_load():
    """Two ids whose loader gives the same waveform share one entry: keys follow content, not names."""
    torch.manual_seed(0)
    enc = _ToyEncoder()
    clips = _clips(2)
    store = {"a": clips[0], "b": clips[1], "a-again": clips[0].copy()}
    cache = FeatureCache(enc, load=store.__getitem__)
    keys = cache.fill(["a", "b", "a-again"])
    assert keys[0] == keys[2] != keys[1] and cache.computed == 2
    assert torch.equal(cache.get("a-again"), cache.get("a"))
