"""The wheel installs one import name, `sottovoce`; the bare folder names never leak into site-packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("sottovoce-*.whl")
    return built


def test_wheel_has_a_single_top_level_import_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sottovoce"}
    for package in ("client", "daemon", "tray"):
        for init in (ROOT / package).rglob("__init__.py"):
            assert f"sottovoce/{init.relative_to(ROOT).as_posix()}" in names, f"{init} is missing from the wheel"


def test_wheel_ships_the_protocol_spec_and_console_script(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    assert "sottovoce/client/PROTOCOL.md" in archive.namelist()
    (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    assert "sottovoce = sottovoce.client.cli:main" in archive.read(entry_points).decode()


def test_installed_package_is_importable_by_its_full_name_only() -> None:
    import importlib.util

    assert importlib.util.find_spec("sottovoce.daemon") is not None
    # `daemon` as a bare name must not be ours (python-daemon owns that name)
    spec = importlib.util.find_spec("daemon")
    assert spec is None or "sottovoce" not in str(spec.origin or "")
