"""Shared fixtures: tiny random-initialised causal LMs saved as local model folders (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub call fails at once instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

DATA = Path(__file__).parent / "data"


def _require_system_package(present: bool, package: str, what: str) -> None:
    """Stop a test that needs a system package which is not installed: a failure under CI (``CI=true``, set by
    ``.ci/run`` and by CI services), so a missing dependency cannot pass as a skip; a skip with the reason locally."""
    if present:
        return
    message = f"{what} needs the system package {package}: sudo apt-get install {package} (scripts/setup.sh does)"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def system_package():
    """``system_package(present, package, what)``: see :func:`_require_system_package`."""
    return _require_system_package


def _train_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer trained on the built-in instruction set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modaltune.text.data import builtin_path

    texts = []
    for line in builtin_path("clinical_sft").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row["context"], row["response"]]
    texts.append("### Instruction:\n### Input:\n### Response:\n### User:\n### Assistant:\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def _make_model(folder: Path, kind: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(folder)
    vocab = len(AutoTokenizer.from_pretrained(str(folder)))
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    else:
        cfg = Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=16, tie_word_embeddings=True,
                               layer_types=["sliding_attention", "full_attention"], **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a 2-layer random Llama (hidden 64) with a 512-token BPE tokenizer."""
    return _make_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    """Folder of a 2-layer random Gemma-3 text model (tied embeddings, sliding + full attention)."""
    return _make_model(tmp_path_factory.mktemp("tiny-gemma"), "gemma")


def _builtin_slice(tmp_path_factory, name: str, rows: int = 40) -> Path:
    from modaltune.text.data import builtin_path

    lines = builtin_path(name).read_text(encoding="utf-8").splitlines()[:rows]
    path = tmp_path_factory.mktemp("data") / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    """A 40-example slice of the built-in instruction set as a JSONL file."""
    return _builtin_slice(tmp_path_factory, "clinical_sft")


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> Path:
    """The first 40 built-in preference pairs (the rows of ``sft_data``, in the same order)."""
    return _builtin_slice(tmp_path_factory, "clinical_pref")


@pytest.fixture(autouse=True)
def _isolated_home(request, tmp_path, monkeypatch):
    """Fast tests get their own MODALTUNE_HOME; ``slow`` tests use the real one (where packaged models live)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("MODALTUNE_HOME", str(tmp_path / "modaltune-home"))


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests are skipped on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A tiny random English-only Whisper folder (d=64, 2+2 layers, full 30 s window) with processor and
    generation config, made through the real CT2 converter from the CT2 writer in ``test_whisper_ct2.py``."""
    import importlib.util

    from modaltune.audio.whisper_ct2 import ct2_to_transformers

    spec = importlib.util.spec_from_file_location("_ct2_kit", Path(__file__).parent / "test_whisper_ct2.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    kit.SOURCE_POSITIONS = 1500  # the real feature extractor's 3000 mel frames
    ct2 = tmp_path_factory.mktemp("tiny-whisper-ct2")
    kit._make_ct2(ct2)
    out = tmp_path_factory.mktemp("tiny-whisper") / "model"
    ct2_to_transformers(ct2, out, name="tiny-whisper", multilingual=False)
    return out


@pytest.fixture(scope="session")
def speech_manifests(tmp_path_factory) -> dict[str, Path]:
    """Small train/test manifests of real-looking speech: tones and noise shaped like words, 16 kHz WAVs."""
    import json

    import numpy as np
    import soundfile as sf

    root = tmp_path_factory.mktemp("speech")
    rng = np.random.default_rng(0)
    words = ["he was not an ill disposed young man", "the patient reports chest pain",
             "shortness of breath", "take metformin twice daily"]
    out = {}
    for split, n in (("train", 12), ("test", 4)):
        rows = []
        for i in range(n):
            secs = 1.0 + 0.25 * (i % 4)
            t = np.arange(int(16000 * secs)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(t.size)
            path = root / f"{split}-{i}.wav"
            sf.write(path, wave.astype(np.float32), 16000)
            rows.append({"audio": path.name, "text": words[i % len(words)], "speaker": f"s{i % 2}"})
            if split == "train" and i % 4 == 0:
                rows[-1]["replay"] = True  # general speech replayed against forgetting
        out[split] = root / f"{split}.jsonl"
        out[split].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def _images(folder, n=6):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(255, 0, 0), (0, 0, 255), (0, 160, 0)]
    paths = []
    for i in range(n):
        img = Image.new("RGB", (48, 48), (255, 255, 255))
        img.paste(colours[i % 3], (8 + i, 8, 36, 36))
        paths.append(folder / f"img{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="session")
def vqa_files(tmp_path_factory) -> Path:
    """A tiny VQA set: 6 coloured-square images, a colour and a yes/no question for each (jsonl layout)."""
    root = tmp_path_factory.mktemp("vqa")
    paths = _images(root / "images")
    names = ["red", "blue", "green"]
    rows = []
    for i, p in enumerate(paths):
        rows.append({"image": f"images/{p.name}", "question": "What color is the shape?", "answer": names[i % 3]})
        rows.append({"image": f"images/{p.name}", "question": "Is there a red shape?",
                     "answer": "yes" if i % 3 == 0 else "no"})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    return root


def _lora_sft(folder, data, method="lora"):
    """A tiny causal LM from ``folder`` with one adapter (r=4, no dropout) and the training split of ``data`` tokenised:
    ``(model, tokenizer, dataset)``, the same initialisation every call."""
    from modaltune.shared.lm import ModelConfig, build_text_model
    from modaltune.shared.peft import ComponentConfig
    from modaltune.text.data import InstructionDataConfig, PromptFormatter, TokenizedDataset, load_splits

    torch.manual_seed(0)
    model, tok, _ = build_text_model(ModelConfig(name=str(folder)), ComponentConfig(method=method, r=4, dropout=0.0),
                                     compute_dtype=torch.float32)
    splits = load_splits(InstructionDataConfig(source=str(data), split=[1.0, 0.0, 0.0]))
    ds = TokenizedDataset(splits.examples["train"], PromptFormatter(tok), 256, splits.skipped["train"])
    return model, tok, ds


@pytest.fixture(scope="session")
def lora_sft():
    """The builder of a tiny LoRA model and its tokenised training split (see :func:`_lora_sft`)."""
    return _lora_sft


@pytest.fixture(scope="session")
def crash():
    """A Trainer callback class: ``crash(at)`` raises KeyboardInterrupt right after step ``at`` was logged (and
    before any checkpoint of that step), as a user's Ctrl-C would."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def __init__(self, at):
            self.at = at

        def on_log(self, args, state, control, **kw):
            if state.global_step == self.at:
                raise KeyboardInterrupt

    return Crash
