"""A non-editable install ships the whole library: every module under seqgen/, the templates and the configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_module_template_and_config(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside pyproject.toml
    for name in ("seqgen", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("seqgen-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for p in (REPO / "seqgen").rglob("*.py")}
    expected |= {p.relative_to(REPO).as_posix() for p in (REPO / "seqgen" / "configs").glob("*.json")}
    expected |= {f"seqgen/templates/{p.name}" for p in (REPO / "templates").glob("*.j2")}
    assert sorted(expected - shipped) == []
