"""`pip install` of peftkit into someone else's environment keeps the torch that is already there.

The environment: a fresh venv whose torch is another release (a CUDA build, as most GPU machines have),
and the other dependencies already present. They are metadata-only distributions (a ``.dist-info``
folder, no code): pip decides what to install from metadata alone, so this tests the package's
requirements without gigabytes of wheels or a network. Both ways in are tried: a wheel built from the
clone, and the clone itself. A dependency pinned to the CPU release (``torch==2.13.0``) would make pip
look for that torch, find nothing (``--no-index``), and fail.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OTHER_TORCH = "2.5.1+cu121"


def _fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("test\n")
    (info / "RECORD").write_text(f"{info.name}/METADATA,,\n{info.name}/INSTALLER,,\n{info.name}/RECORD,,\n")


def _requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("peftkit-*.whl")
    return path


def _venv_with_other_torch(root: Path) -> tuple[Path, Path]:
    """A venv without pip whose torch is another release and whose other dependencies are present."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _fake_dist(site, "torch", OTHER_TORCH)
    for req in _requirements():
        if req.name != "torch":
            _fake_dist(site, req.name, md.version(req.name))  # the versions this project is tested with
    # The build backend for `pip install .` (no index to fetch it from): this interpreter's setuptools.
    tools = root / "build-tools"
    tools.mkdir()
    setuptools_dist = md.distribution("setuptools")
    for name in ("setuptools", "_distutils_hack", "pkg_resources", setuptools_dist._path.name):  # noqa: SLF001
        source = Path(sysconfig.get_paths()["purelib"]) / name
        if source.exists():
            (tools / name).symlink_to(source)
    (site / "build-tools.pth").write_text(str(tools) + "\n")
    return python, site


def _pip(*args: str, python: Path) -> subprocess.CompletedProcess:
    # The venv has no pip of its own (quicker to make); this pip works on it with --python.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the venv's own packages count
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check",
                           "--no-input", *args], capture_output=True, text=True, timeout=180, env=env)


# The clone case builds the wheel a second time (~15 s more), so it runs with the slow tests.
@pytest.mark.parametrize("source", ["wheel", pytest.param("clone", marks=pytest.mark.slow)])
def test_pip_install_keeps_the_torch_already_installed(source, wheel, tmp_path):
    assert "torch" in {r.name for r in _requirements()}
    python, site = _venv_with_other_torch(tmp_path / "venv")
    target = str(wheel) if source == "wheel" else str(ROOT)
    # --no-index: nothing can be downloaded, so every requirement must be met by what is installed.
    done = _pip("install", "--no-index", "--no-build-isolation", target, python=python)
    assert done.returncode == 0, done.stdout + done.stderr
    listing = _pip("list", "--format=freeze", python=python)
    installed = dict(line.split("==", 1) for line in listing.stdout.split() if "==" in line)
    assert installed["torch"] == OTHER_TORCH, installed  # left in place
    assert installed["peftkit"] == md.version("peftkit")
    assert (site / "peftkit" / "evaluate" / "metrics.py").is_file()  # the code itself, not only metadata
