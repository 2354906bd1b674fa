"""The wheel installs everything under the single import name ``modaltune``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package_and_its_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("modaltune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"modaltune"}, top
    for required in ("modaltune/shared/cli.py", "modaltune/text/data/clinical_sft.jsonl",
                     "modaltune/recipes/configs/text-sft.yaml", "modaltune/vision/__init__.py",
                     "modaltune/audio/__init__.py", "modaltune/__main__.py"):
        assert required in names, required
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "modaltune = modaltune.shared.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_module_entry_points_answer_help():
    for args in (["-m", "modaltune", "--help"], ["-m", "modaltune.shared.cli", "run", "--help"]):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd="/")
        assert proc.returncode == 0 and "usage: modaltune" in proc.stdout, proc.stderr[-1000:]
