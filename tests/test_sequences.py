"""One prompt+target rule and one padding rule for every dataset and collator, and one token-weighted loss.

The reference functions below are the rules each dataset wrote for itself before they shared
``modaltune.shared.sequences`` (instruction tuning and preference pairs, composed models, the audio-LLM cascade);
the datasets must still build exactly those sequences.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from modaltune.shared.loss import labelled_tokens, token_weighted_loss
from modaltune.shared.sequences import encode_prompt_target, pad_batch, pad_sequences
from modaltune.shared.skips import Skips
from modaltune.text.data import Example, InstructionDataConfig, PadCollator, PromptFormatter, TokenizedDataset, load_splits

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TURNS = [{"role": "user", "content": "What is BP?"}, {"role": "assistant", "content": "blood pressure"},
         {"role": "user", "content": "And HR?"}]


def _tokenizer(folder) -> AutoTokenizer:
    """The tiny tokenizer, putting BOS first when asked for special tokens (as Gemma's and Llama's do)."""
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<bos> $A",
                                                              special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def _text_rule(tok, fmt: PromptFormatter, ex: Example) -> tuple[list[int], list[int], list[int]]:
    """Instruction tuning's rule: the prompt (special tokens unless a chat template), masked except earlier answers
    (the formatter finds them), then the response and EOS."""
    prompt = fmt.prompt(ex)
    spans = fmt.earlier_answers(ex, prompt) if fmt.train_on == "all" else []
    enc = tok(prompt, add_special_tokens=not fmt.use_chat, return_offsets_mapping=True)
    prompt_ids = enc["input_ids"]
    prompt_labels = [t if any(a <= s < b for a, b in spans) and e > s else -100
                     for t, (s, e) in zip(prompt_ids, enc["offset_mapping"])]
    response = tok(ex.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids, prompt_ids + response, prompt_labels + response


def _composed_rule(tok, prompt: str, target: str, placeholder: str) -> tuple[list[int], list[int], int]:
    """Composed models' rule: BOS and the text before the placeholder, one pad token for it, the rest, then a space,
    the stripped target and EOS."""
    before, after = prompt.split(placeholder)
    head = tok(before, add_special_tokens=True)["input_ids"]
    ids = head + [tok.pad_token_id] + tok(after, add_special_tokens=False)["input_ids"]
    target_ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids + target_ids, [-100] * len(ids) + target_ids, len(head)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_instruction_rows_follow_the_rule_with_either_template(fixture, request, sft_data):
    tok = _tokenizer(request.getfixturevalue(fixture))
    examples = load_splits(InstructionDataConfig(source=str(sft_data), split=[1.0, 0.0, 0.0])).examples["train"]
    examples = examples[:12] + [Example("conv", TURNS, "heart rate")]
    for template in ("plain", "chat"):
        tok.chat_template = CHAT if template == "chat" else None
        for train_on in ("all", "last"):
            fmt = PromptFormatter(tok, template, train_on)
            skipped = Skips()
            ds = TokenizedDataset(examples, fmt, 60, skipped)
            want = {ex.id: _text_rule(tok, fmt, ex) for ex in examples}
            kept = [ex.id for ex in examples if len(want[ex.id][1]) <= 60]
            assert [ex.id for ex in ds.examples] == kept and 0 < len(kept) < len(examples)
            assert sum(n for _, n in skipped.items()) == len(examples) - len(kept)
            for item, ex in zip(ds.items, ds.examples):
                assert (item["prompt_ids"], item["input_ids"], item["labels"]) == want[ex.id]
                assert (item["input_ids"][0] == tok.bos_token_id) == (template == "plain")  # chat: the template's
            conv = want["conv"][2]
            learnt = [t for t in conv if t != -100]
            assert ("blood pressure" in tok.decode(learnt)) == (train_on == "all")


def test_preference_pairs_are_two_instruction_sequences(tiny_llama, pair_data):
    from modaltune.text.preference import PairDataConfig, TokenizedPairs, load_pairs

    tok = _tokenizer(tiny_llama)
    fmt = PromptFormatter(tok, "plain")
    pairs, _ = load_pairs(PairDataConfig(source=str(pair_data), split=[1.0, 0.0, 0.0]))
    pairs = pairs["train"][:12]
    longest = {p.example.id: max(len(_text_rule(tok, fmt, ex)[1]) for ex in (p.example, p.rejected_example))
               for p in pairs}
    limit = sorted(longest.values())[len(pairs) // 2]
    skipped = Skips()
    tp = TokenizedPairs(pairs, fmt, limit, skipped)
    assert [p.example.id for p in tp.pairs] == [p.example.id for p in pairs if longest[p.example.id] <= limit]
    assert 0 < len(tp) < len(pairs) and sum(n for _, n in skipped.items()) == len(pairs) - len(tp)
    for item, pair in zip(tp.items, tp.pairs):
        for side, ex in (("chosen", pair.example), ("rejected", pair.rejected_example)):
            _, ids, labels = _text_rule(tok, fmt, ex)
            assert item[side] == {"input_ids": ids, "labels": labels}


def test_composed_rows_keep_the_placeholder_and_the_stripped_target(tiny_gemma):
    from modaltune.shared.compose_data import ComposedDataset

    tok = _tokenizer(tiny_gemma)
    texts = [("<AudioHere> Transcribe.", " chest pain "), ("Question: <AudioHere>\nAnswer:", "yes"),
             ("<AudioHere>", ""), ("Describe <AudioHere> " + "in detail " * 12, "the patient " * 8)]
    rows = [{"id": f"r{i}", "input": f"clip{i}", "prompt": p, "target": t} for i, (p, t) in enumerate(texts)]
    skipped = Skips()
    ds = ComposedDataset(rows, tok, None, placeholder="<AudioHere>", max_length=40, skipped=skipped)
    want = [_composed_rule(tok, p, t, "<AudioHere>") for p, t in texts]
    assert [r["id"] for r in ds.rows] == [r["id"] for r, w in zip(rows, want) if len(w[0]) <= 40] == ["r0", "r1", "r2"]
    for item, (ids, labels, pos) in zip(ds.items, want):
        assert (item["input_ids"], item["labels"], item["placeholder_position"]) == (ids, labels, pos)
        assert ids[0] == tok.bos_token_id and ids[pos] == tok.pad_token_id and labels[-1] == tok.eos_token_id
        assert item["prompt_ids"] == ids[: labels.index(next(t for t in labels if t != -100))]


def test_a_text_prompt_is_tokenised_with_its_special_tokens(tiny_gemma):
    tok = _tokenizer(tiny_gemma)
    enc = encode_prompt_target(tok, "Patient reports chest pain.", " angina")
    prompt = tok("Patient reports chest pain.", add_special_tokens=True)["input_ids"]
    target = tok(" angina", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id and enc.prompt_ids == prompt
    assert enc.input_ids == prompt + target + [tok.eos_token_id]
    assert enc.labels == [-100] * len(prompt) + target + [tok.eos_token_id]
    assert encode_prompt_target(tok, "Patient", " x", special_tokens=False).prompt_ids[0] != tok.bos_token_id
    n = len(enc.input_ids)
    assert encode_prompt_target(tok, "Patient reports chest pain.", " angina", max_length=n) == enc
    assert encode_prompt_target(tok, "Patient reports chest pain.", " angina", max_length=n - 1) is None
    kept = encode_prompt_target(tok, prompt, " angina", prompt_labels=prompt)
    assert kept.labels == prompt + target + [tok.eos_token_id]


def test_padding_right_and_left_with_labels_and_mask():
    ids, mask = pad_sequences([[5], [6, 7, 8], []], 0)
    assert ids.tolist() == [[5, 0, 0], [6, 7, 8], [0, 0, 0]] and mask.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_sequences([[5], [6, 7]], 9, left=True, width=4)
    assert ids.tolist() == [[9, 9, 9, 5], [9, 9, 6, 7]] and mask.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]
    batch = pad_batch([[1, 2, 3], [4]], [[-100, 2, 3], [4]], pad_id=0, left=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert "labels" not in pad_batch([[1]], pad_id=0)


def test_every_collator_pads_by_the_one_rule(tiny_gemma):
    from modaltune.audio.features import ASRCollator
    from modaltune.shared.compose_data import ComposedCollator, ComposedDataset

    tok = _tokenizer(tiny_gemma)
    rows = [{"id": f"r{i}", "input": i, "prompt": p, "target": t}
            for i, (p, t) in enumerate([("<AudioHere> Say.", "hello there"), ("A longer question: <AudioHere>?", "no")])]
    ds = ComposedDataset(rows, tok, None, placeholder="<AudioHere>", max_length=64, skipped=Skips())
    items = [{**ds[i], "features": torch.zeros(2, 3)} for i in range(2)]
    for left in (False, True):
        train = ComposedCollator(tok.pad_token_id, left=left)(items)
        want = pad_batch([it["input_ids"] for it in items], [it["labels"] for it in items], pad_id=tok.pad_token_id,
                         left=left)
        for key in want:
            assert torch.equal(train[key], want[key]), key
        gen = ComposedCollator(tok.pad_token_id, left=left, prompt_only=True)(items)
        assert "labels" not in gen
        ids = gen["input_ids"]
        for row, it in enumerate(items):  # the placeholder moves with the padding
            assert ids[row, gen["placeholder_positions"][row]] == tok.pad_token_id
            assert gen["attention_mask"][row, gen["placeholder_positions"][row]] == 1
        assert torch.equal(gen["input_ids"], pad_sequences([it["prompt_ids"] for it in items], tok.pad_token_id,
                                                           left=left)[0])
    text = PadCollator(tok.pad_token_id)([{"input_ids": [3, 4, 5], "labels": [-100, 4, 5]}, {"input_ids": [6],
                                                                                              "labels": [6]}])
    assert text["labels"].tolist() == [[-100, 4, 5], [6, -100, -100]] and text["input_ids"][1, 1:].tolist() == [
        tok.pad_token_id] * 2
    asr = ASRCollator()([{"labels": [1, 2], "features": torch.zeros(2)}, {"labels": [3], "features": torch.ones(2)}])
    assert asr["labels"].tolist() == [[1, 2], [3, -100]]


def test_token_weighted_loss_does_not_depend_on_batching(tiny_llama, sft_data):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    examples = load_splits(InstructionDataConfig(source=str(sft_data), split=[1.0, 0.0, 0.0])).examples["train"][:5]
    ds = TokenizedDataset(examples, PromptFormatter(tok, "plain"), 256, Skips())
    collate = PadCollator(tok.pad_token_id)
    sums = [model(**collate([ds[i]])).loss.item() * sum(t != -100 for t in ds[i]["labels"][1:]) for i in range(5)]
    tokens = sum(sum(t != -100 for t in ds[i]["labels"][1:]) for i in range(5))
    for size in (1, 2, 5):
        batches = (collate([ds[i] for i in range(s, min(s + size, 5))]) for s in range(0, 5, size))
        assert token_weighted_loss(model, batches) == pytest.approx(sum(sums) / tokens, rel=1e-5)
    assert token_weighted_loss(model, iter([])) == 0.0


def test_labelled_tokens_follow_the_models_shift():
    class Unshifted(torch.nn.Module):
        shifted_labels = False

    labels = torch.tensor([[5, -100, 6], [-100, -100, 7]])
    assert labelled_tokens(torch.nn.Module(), labels).tolist() == [1, 1]  # a causal LM never scores position 0
    assert labelled_tokens(Unshifted(), labels).tolist() == [2, 1]
