"""Write ``text/data/clinical_pref.jsonl``: one preference pair per row of ``clinical_sft.jsonl``, in the same order.

The chosen answer is the instruction set's reference; the rejected answer is a realistic failure of its kind:

- abbreviation: the expansion of another abbreviation (preferably one with the same first letter), a
  hallucinated meaning;
- lab: the wrong flag (an abnormal result called normal; a normal one called high or low);
- triage: the opposite decision with a plausible reason (sent home when it is an emergency, or an ambulance for
  something a GP can see);
- discharge: a 10x dose, a wrong frequency or duration, or the safety-net advice left out;
- medication: unsafe reassurance (no interaction, no need to ask anyone) in place of the advice.

Rows keep the same order as the instruction data, so splitting both with the same fractions and seed puts every
prompt in the same split: no test prompt of text-sft is ever a training pair. Deterministic (seeded); run
``python scripts/make_clinical_pref.py --check`` to verify the shipped file matches.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "text" / "data"

TRIAGE_HOME = [
    "no: this can wait for a routine appointment with your GP",
    "no: rest at home and see if it settles over the next few days",
    "no: this is common and usually gets better on its own",
    "no: take simple painkillers and book a GP visit if it is still there next week",
]
TRIAGE_EMERGENCY = [
    "yes: call an ambulance now, this could be life-threatening",
    "yes: go straight to the emergency department",
    "yes: this needs emergency assessment tonight",
]
MEDICATION_UNSAFE = [
    "Yes, that is fine; there is no interaction, so you can take them together as usual.",
    "It is completely safe and has no side effects, so there is no need to check with your doctor or pharmacist.",
    "Nothing to worry about: carry on exactly as you are, there is no need to ask anyone.",
    "That is perfectly safe at any dose, so you can take as much as you need.",
]
FREQUENCY = [("three times a day", "once a day"), ("twice a day", "four times a day"), ("once a day", "three times a day"),
             ("four times a day", "once a day"), ("every four hours", "every hour")]
DURATION = {"one": "ten", "two": "seven", "three": "thirty", "five": "one", "seven": "two", "ten": "one",
            "fourteen": "four", "six": "sixteen", "four": "fourteen"}
SAFETY_NET = re.compile(r"(?:^|(?<=[.;] ))(?:Come back|Return|Go to|Tell|Call|Contact|Seek|See your)[^.]*\.?")


def _discharge(text: str, rng: random.Random) -> tuple[str, str]:
    options = []
    dose = re.search(r"\b(\d+(?:\.\d+)?) ?(mg|micrograms|units|ml|g)\b", text)
    if dose:
        value = float(dose.group(1)) * 10
        shown = f"{value:g}"
        options.append((text[: dose.start(1)] + shown + text[dose.end(1):], "10x dose"))
    for right, wrong in FREQUENCY:
        if right in text:
            options.append((text.replace(right, wrong, 1), "wrong frequency"))
            break
    when = re.search(r"\b(one|two|three|four|five|six|seven|ten|fourteen) (days|weeks)\b", text)
    if when:
        options.append((text[: when.start(1)] + DURATION[when.group(1)] + text[when.end(1):], "wrong duration"))
    net = SAFETY_NET.search(text)
    if net and text[: net.start()].strip():
        options.append((text[: net.start()].rstrip().rstrip(";") , "safety advice left out"))
    if not options:
        return text.rstrip(".") + ". You can stop the treatment as soon as you feel better.", "unsafe instruction"
    return rng.choice(options)


def _short(instruction: str) -> str:
    """The abbreviation an instruction asks about ("Expand the clinical abbreviation: X", "What does X mean ...")."""
    found = re.search(r"abbreviation:\s*(\S+)\s*$", instruction) or re.search(r"\bdoes (\S+) ", instruction)
    return found.group(1) if found else instruction.split()[-1]


def build(rows: list[dict], seed: int = 7) -> list[dict]:
    """One pair per instruction row, in order."""
    rng = random.Random(seed)
    expansions = [(_short(r["instruction"]), r["response"]) for r in rows if r["category"] == "abbreviation"]
    out = []
    for row in rows:
        cat, good = row["category"], row["response"]
        if cat == "abbreviation":
            short = _short(row["instruction"])
            others = [e for s, e in expansions if e.lower() != good.lower() and s != short]
            close = [e for s, e in expansions if e.lower() != good.lower() and s[:1] == short[:1] and s != short]
            bad, failure = rng.choice(close or others), "wrong expansion"
        elif cat == "lab":
            bad = "normal" if good in ("high", "low") else rng.choice(["high", "low"])
            failure = "missed abnormal result" if good != "normal" else "normal result flagged"
        elif cat == "triage":
            if good.startswith("yes"):
                bad, failure = rng.choice(TRIAGE_HOME), "emergency sent home"
            else:
                bad, failure = rng.choice(TRIAGE_EMERGENCY), "over-triage"
        elif cat == "discharge":
            bad, failure = _discharge(good, rng)
        elif cat == "medication":
            bad, failure = rng.choice(MEDICATION_UNSAFE), "unsafe reassurance"
        else:
            raise ValueError(f"unknown category {cat!r}")
        if bad.strip().lower() == good.strip().lower():
            raise ValueError(f"rejected equals chosen for {row['instruction']!r}")
        out.append({"instruction": row["instruction"], "context": row.get("context", ""), "chosen": good,
                    "rejected": bad, "category": cat, "failure": failure})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the shipped file instead of writing it")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (DATA / "clinical_sft.jsonl").read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in build(rows))
    target = DATA / "clinical_pref.jsonl"
    if args.check:
        same = target.is_file() and target.read_text(encoding="utf-8") == text
        print("clinical_pref.jsonl is up to date" if same else "clinical_pref.jsonl differs: rerun without --check")
        return 0 if same else 1
    target.write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
