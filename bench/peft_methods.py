"""Benchmark: the memory-efficient PEFT methods' training step against LoRA's, and MeZO's against an evaluation pass.

Same model, batches (the first of text-sft's training split) and adapter targets for every variant. Each variant runs
in its own process, so its peak memory is its own; rounds interleave the variants (``bench/timing.py``).

    python bench/peft_methods.py                      # gemma-3-270m, batch 8, 3 rounds x 6 timed steps
    python bench/peft_methods.py --model PATH --rounds 5 --steps 8

Variants (all through the recipe's Trainer and config, text-sft's defaults otherwise):
    lora      the baseline: LoRA r=16 on every projection, AdamW
    lora_fa   LoRA-FA: A fixed, B trained by peft's LoRA-FA optimizer
    dylora    DyLoRA: r=16, a rank drawn per step
    mezo      LoRA trained by MeZO: two forward passes, no backward, no optimizer state
    eval      an evaluation pass: the same forward on the same batches, no gradients (MeZO's memory yardstick)

Printed: step time as a ratio to LoRA's in the same round; peak resident memory, and its rise above the memory after
the model was built (the step's own memory), each as a ratio to the evaluation pass; optimizer state; trainable
parameters.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

VARIANTS = ["lora", "lora_fa", "dylora", "mezo", "eval"]


def run_variant(args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from text_sft import PeakRSS, _batches, rss_mb, trainer_steps

    from modaltune.shared.config import load_config
    from modaltune.shared.recipe import get_recipe
    from modaltune.shared.training import optimizer_state_mb, resolve_precision

    torch.manual_seed(0)
    recipe = get_recipe("text-sft")
    method = {"eval": "lora", "mezo": "lora"}.get(args.variant, args.variant)
    cfg = load_config(recipe.config_cls, recipe.default_config_path(),
                      [f"model.name={args.model}", f"train.batch_size={args.batch_size}", f"llm.method={method}"])
    model, tok, _ = recipe.build_model(cfg)
    precision = resolve_precision(cfg.train.precision)
    batches, ds = _batches(args, tok, cfg)
    built = rss_mb()
    times: list[float] = []
    state_mb = 0.0
    if args.variant == "eval":
        model.eval()
        with PeakRSS() as mem, torch.no_grad():
            for batch in batches:
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    model(**batch)["loss"]
                times.append(time.perf_counter() - t)
    else:
        trainer_cls, extra, callbacks = None, {}, []
        if args.variant == "mezo":
            from modaltune.shared.mezo import MeZOTrainer

            trainer_cls, extra = MeZOTrainer, {"mezo_eps": cfg.train.mezo_eps}
        for state in model.peft_states:  # a PEFT method's per-step hooks (DyLoRA's rank draw)
            callbacks += state.callbacks(cfg.train.seed)
        trainer, mem = trainer_steps(args, model, tok, ds, cfg, precision, times, trainer_cls=trainer_cls,
                                     callbacks=callbacks, **extra)
        state_mb = optimizer_state_mb(trainer.optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"variant": args.variant, "precision": precision, "times": times[args.warmup:], "peak_rss_mb": mem.peak_mb,
            "built_rss_mb": built, "optimizer_state_mb": state_mb, "trainable": trainable}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from timing import check_step_arguments, step_arguments, summary, table, variant_rounds

    p = step_arguments(__doc__.split("\n\n")[0], VARIANTS)
    args = p.parse_args(argv)
    check_step_arguments(p, args)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0
    rounds, runs = variant_rounds(__file__, VARIANTS, args)
    print(table(f"\nPEFT method step benchmark: {args.model}, batch {args.batch_size} (eval: forward only)", rounds,
                "lora", label="x lora"))
    peak = {v: statistics.median(r["peak_rss_mb"] for r in runs[v]) for v in VARIANTS}
    rise = {v: statistics.median(r["peak_rss_mb"] - r["built_rss_mb"] for r in runs[v]) for v in VARIANTS}
    print(f"\n{'variant':10s} {'peak RSS MB':>12s} {'x eval':>7s} {'rise MB':>9s} {'x eval':>7s} "
          f"{'optimizer MB':>13s} {'trainable':>11s}")
    for v in VARIANTS:
        r0 = runs[v][0]
        print(f"{v:10s} {peak[v]:12.0f} {peak[v] / peak['eval']:7.2f} {rise[v]:9.0f} "
              f"{rise[v] / max(rise['eval'], 1e-9):7.2f} {r0['optimizer_state_mb']:13.2f} {r0['trainable']:11,d}")
    print("(medians over rounds; rise = peak minus the resident memory once the model was built)")
    if args.json:
        result = summary(rounds, "lora")
        for v in VARIANTS:
            result[v].update(peak_rss_mb=[r["peak_rss_mb"] for r in runs[v]], rise_mb=rise[v],
                             optimizer_state_mb=runs[v][0]["optimizer_state_mb"], trainable=runs[v][0]["trainable"])
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
