"""Benchmark: modaltune's text-sft training step vs a plain transformers + peft loop.

Same model, LoRA config, data and batches (the first batches of the recipe's training split). Each variant runs in
its own process so peak memory is its own; the table prints step time and peak memory as ratios against the plain
fp32 loop measured in the same run.

    python bench/text_sft.py                      # gemma-3-270m from the zoo, batch 8, 3 rounds x 6 timed steps
    python bench/text_sft.py --model PATH --rounds 5 --steps 8 --batch-size 4

Every round runs each variant in a fresh process: ``--warmup`` untimed steps, then ``--steps`` timed ones on the same
batches. The table gives each variant's median step time and the median and range over rounds of its ratio to the
plain fp32 loop in the same round (``bench/timing.py``). A second table puts each speed beside its ceiling: the
FLOPs one step executes (counted by torch's FlopCounterMode), the FLOP/s that makes at the median step time, and
this machine's matmul peak for the variant's precision, measured in the same process.

Variants:
    plain       model(**batch).loss (full logits), fp32: what a straightforward loop does
    plain-bf16  the same loop under bf16 autocast (isolates the precision gain)
    modaltune   the recipe's Trainer step: label-position-only logits, precision from the config (auto)
"""

from __future__ import annotations

import json
import os
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


def rss_mb() -> float:
    """This process's resident memory now, in MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batches(args, tok, cfg):

    from modaltune.text.data import PadCollator, PromptFormatter, TokenizedDataset, load_splits

    splits = load_splits(cfg.data)
    formatter = PromptFormatter(tok, cfg.model.template, cfg.data.train_on)
    ds = TokenizedDataset(splits.examples["train"], formatter, cfg.data.max_length, splits.skipped["train"])
    collate = PadCollator(tok.pad_token_id)
    n = args.batch_size
    return [collate([ds[i] for i in range(k * n, (k + 1) * n)]) for k in range(args.warmup + args.steps)], ds


def trainer_steps(args, model, tok, ds, cfg, precision: str, times: list[float], *, trainer_cls=None,
                  callbacks=(), **trainer_kwargs):
    """The recipe's Trainer (``trainer_cls``, ModaltuneTrainer by default) over the first ``warmup + steps`` batches
    of ``ds``, in order, each optimizer step's seconds appended to ``times``. Returns the trainer and its PeakRSS."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from modaltune.shared.training import ModaltuneTrainer
    from modaltune.text.data import PadCollator

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    class Sequential(trainer_cls or ModaltuneTrainer):  # the same batches, in the same order, for every variant
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    mezo = getattr(trainer_cls, "_uses_gradients", True) is False
    trainer = Sequential(
        model=model,
        args=TrainingArguments(output_dir="/tmp/modaltune-bench", per_device_train_batch_size=args.batch_size,
                               max_steps=args.warmup + args.steps, learning_rate=cfg.train.lr, save_strategy="no",
                               report_to=[], bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
                               max_grad_norm=0.0 if mezo else cfg.train.max_grad_norm, disable_tqdm=True,
                               logging_steps=1000, remove_unused_columns=False),
        train_dataset=torch.utils.data.Subset(ds, range((args.warmup + args.steps) * args.batch_size)),
        data_collator=PadCollator(tok.pad_token_id), callbacks=[Clock(), *callbacks], **trainer_kwargs,
    )
    with PeakRSS() as mem:
        trainer.train()
    return trainer, mem


def run_variant(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from timing import count_flops, matmul_peak

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
        from modaltune.shared.lm import load_tokenizer

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

        def one_step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batches[args.warmup]).loss
            loss.backward()
    else:
        from modaltune.shared.training import resolve_precision

        model, tok, _ = recipe.build_model(cfg)
        precision = resolve_precision(cfg.train.precision)
        batches, ds = _batches(args, tok, cfg)
        _, mem = trainer_steps(args, model, tok, ds, cfg, precision, times)

        def one_step():  # the recipe's forward and backward (answer-position logits) on the first timed batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(**batches[args.warmup])["loss"]
            loss.backward()
    flops = count_flops(one_step)
    peak = matmul_peak(precision)
    timed = batches[args.warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)
    padded = sum(b["input_ids"].numel() for b in timed)
    return {"variant": args.variant, "precision": precision, "times": times[args.warmup:],
            "peak_rss_mb": mem.peak_mb, "flops": flops, "matmul_peak": peak, "tokens": tokens, "labelled_tokens": labelled, "padded_positions": padded}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from timing import (check_step_arguments, step_arguments, summary, table, utilisation_table, utilisations,
                        variant_rounds)

    p = step_arguments(__doc__.split("\n\n")[0], VARIANTS)
    args = p.parse_args(argv)
    check_step_arguments(p, args)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    rounds, runs = variant_rounds(__file__, VARIANTS, args)
    peaks = {v: [r["peak_rss_mb"] for r in runs[v]] for v in VARIANTS}
    ceilings = {v: [r["matmul_peak"] for r in runs[v]] for v in VARIANTS}
    info = {v: runs[v][-1] for v in VARIANTS}
    r0 = info["modaltune"]
    print(table(f"\ntext-sft step benchmark: {args.model}, batch {args.batch_size}, "
                f"{r0['labelled_tokens']}/{r0['padded_positions']} positions carry a label", rounds, "plain",
                label="x plain"))
    base_peak = min(peaks["plain"])
    print(f"\n{'variant':22s} {'precision':9s} {'peak RSS MB':>12s} {'x plain':>8s}")
    for name in VARIANTS:
        print(f"{name:22s} {info[name]['precision']:9s} {min(peaks[name]):12.0f} {min(peaks[name]) / base_peak:8.2f}")
    precisions = {name: info[name]["precision"] for name in VARIANTS}
    ceiling: dict[str, float] = {}  # per precision: the best peak any variant's process measured
    for name in VARIANTS:
        ceiling[precisions[name]] = max(ceiling.get(precisions[name], 0.0), *ceilings[name])
    use = utilisations(rounds, {name: info[name]["flops"] for name in VARIANTS}, precisions, ceiling)
    print("\n" + utilisation_table(use, precisions))
    if args.json:
        result = summary(rounds, "plain")
        for name in VARIANTS:
            result[name].update(precision=info[name]["precision"], peak_rss_mb=peaks[name], utilisation=use[name])
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
