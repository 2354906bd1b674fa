"""Benchmark: modaltune's text-sft training step vs a plain transformers + peft loop.

Same model, LoRA config, data and batches (the first batches of the recipe's training split). Each variant runs in
its own process so peak memory is its own; the table prints step time and peak memory as ratios against the plain
fp32 loop measured in the same run.

    python bench/text_sft.py                      # gemma-3-270m from the zoo, batch 8, 4 timed steps
    python bench/text_sft.py --model PATH --steps 6 --batch-size 4

Variants:
    plain       model(**batch).loss (full logits), fp32: what a straightforward loop does
    plain-bf16  the same loop under bf16 autocast (isolates the precision gain)
    modaltune   the recipe's Trainer step: label-position-only logits, precision from the config (auto)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = ["plain", "plain-bf16", "modaltune"]


class PeakRSS:
    """Samples this process's resident memory every 5 ms in a thread; ``peak_mb`` is the maximum seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as fh:
                rss = int(fh.read().split()[1]) * self._page
            self.peak = max(self.peak, rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def _batches(args, tok, cfg):

    from modaltune.text.data import PadCollator, PromptFormatter, TokenizedDataset, load_splits

    splits = load_splits(cfg.data)
    ds = TokenizedDataset(splits.examples["train"], PromptFormatter(tok, cfg.model.template), cfg.data.max_length,
                          splits.skipped["train"])
    collate = PadCollator(tok.pad_token_id)
    n = args.batch_size
    return [collate([ds[i] for i in range(k * n, (k + 1) * n)]) for k in range(args.steps + 1)], ds


def run_variant(args) -> dict:
    import torch

    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe

    torch.manual_seed(0)
    recipe = get_recipe("text-sft")
    cfg = load_config(recipe.config_cls, recipe.default_config_path(),
                      [f"model.name={args.model}", f"train.batch_size={args.batch_size}"])
    times = []
    if args.variant.startswith("plain"):
        import peft
        from transformers import AutoModelForCausalLM

        from modaltune.shared.zoo import resolve_model
        from modaltune.text.lm import load_tokenizer

        path, _ = resolve_model(args.model)
        tok = load_tokenizer(path, cfg.model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg.llm.r, lora_alpha=cfg.llm.alpha,
                                                           lora_dropout=cfg.llm.dropout, target_modules=cfg.llm.targets))
        batches, _ = _batches(args, tok, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        model.train()
        bf16 = args.variant == "plain-bf16"
        with PeakRSS() as mem:
            for batch in batches:
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
        precision = "bf16" if bf16 else "fp32"
    else:
        from transformers import TrainerCallback, TrainingArguments

        from modaltune.shared.training import ModaltuneTrainer
        from modaltune.text.data import PadCollator

        model, tok, _, precision = recipe.build(cfg, None)
        batches, ds = _batches(args, tok, cfg)
        subset = torch.utils.data.Subset(ds, range((args.steps + 1) * args.batch_size))

        class Clock(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                times.append(time.perf_counter() - self.t)

        class Sequential(ModaltuneTrainer):  # the same batches, in the same order, as the plain loop
            def _get_train_sampler(self, *a, **kw):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        trainer = Sequential(
            model=model,
            args=TrainingArguments(output_dir="/tmp/modaltune-bench", per_device_train_batch_size=args.batch_size,
                                   max_steps=args.steps + 1, learning_rate=cfg.train.lr, save_strategy="no",
                                   report_to=[], bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
                                   max_grad_norm=cfg.train.max_grad_norm, disable_tqdm=True, logging_steps=1000,
                                   remove_unused_columns=False),
            train_dataset=subset, data_collator=PadCollator(tok.pad_token_id), callbacks=[Clock()],
        )
        with PeakRSS() as mem:
            trainer.train()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[1:])
    padded = sum(b["input_ids"].numel() for b in batches[1:])
    return {"variant": args.variant, "precision": precision, "step_seconds": sum(times[1:]) / len(times[1:]),
            "peak_rss_mb": mem.peak_mb, "tokens": tokens, "labelled_tokens": labelled, "padded_positions": padded}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="zoo name, local folder or hub id")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps (one more untimed warm-up step runs first)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        results[variant] = json.loads(line[7:])
        print(f"measured {variant}: {results[variant]['step_seconds']:.2f} s/step", file=sys.stderr, flush=True)
    base = results["plain"]
    r0 = results["modaltune"]
    print(f"\ntext-sft step benchmark: {args.model}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{r0['labelled_tokens']}/{r0['padded_positions']} positions carry a label")
    print(f"{'variant':12s} {'precision':9s} {'s/step':>8s} {'x plain':>8s} {'peak MB':>9s} {'x plain':>8s}")
    for name, r in results.items():
        print(f"{name:12s} {r['precision']:9s} {r['step_seconds']:8.2f} {r['step_seconds'] / base['step_seconds']:8.2f} "
              f"{r['peak_rss_mb']:9.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
