"""The wheel: built from the checkout, installed into a fresh venv, it runs `moeprep card`.

An editable install reads everything from the checkout, so it hides files the wheel leaves out (the
card template once was). The fresh venv gets only the wheel; its heavy dependencies come from the
running venv through a .pth line, with no network and nothing installed twice. That line adds the
running venv's site-packages as a plain directory, so the `__editable__*.pth` of the checkout's own
moeprep there is not processed: `import moeprep` in the fresh venv finds the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "moeprep/templates/model_card.md.j2"


def _run(*cmd, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(map(str, cmd))
    assert result.returncode == 0, f"{shown} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _checkout(dest: Path) -> Path:
    """What a clean checkout holds (tracked and new files, minus .gitignore's): no build/ whose stale
    files would end up in the wheel, no egg-info, no .venv."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():  # not a file deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = _checkout(tmp / "moeprep")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", tmp / "dist", source, cwd=tmp)
    (built,) = (tmp / "dist").glob("moeprep-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new venv holding the wheel's moeprep, with this venv's site-packages for the dependencies."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", wheel,
         cwd=venv.parent)
    where = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv.parent)
    site = Path(where.stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz-moeprep-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def test_package_wheel_ships_the_card_template(wheel):
    with zipfile.ZipFile(wheel) as z:
        assert TEMPLATE in z.namelist()
        assert z.read(TEMPLATE) == (ROOT / "templates" / "model_card.md.j2").read_bytes()


def test_package_fresh_venv_imports_the_wheel(fresh, tmp_path):
    out = _run(fresh / "bin" / "python", "-c", "import moeprep, moeprep.assets as a; print(moeprep.__file__); "
               "print(a.template())", cwd=tmp_path).stdout.splitlines()
    module, template = (Path(line).resolve() for line in out)
    assert module.is_relative_to(fresh.resolve()), f"the fresh venv imported {module}, not the wheel's moeprep"
    assert template.is_relative_to(fresh.resolve()) and template.is_file()


def test_package_wheel_ships_the_calibration_text(wheel, fresh, tmp_path):
    """The demo trains its model on it, so an installed moeprep must find it without a checkout."""
    with zipfile.ZipFile(wheel) as z:
        shipped = z.read("moeprep/calibration/general-en.txt")
    assert shipped == (ROOT / "recipes" / "calibration" / "general-en.txt").read_bytes()
    out = _run(fresh / "bin" / "python", "-c", "import moeprep.assets as a; print(a.calibration())", cwd=tmp_path)
    assert Path(out.stdout.strip()).resolve().is_relative_to(fresh.resolve())


def test_help_from_a_wheel_install(fresh, tmp_path):
    result = _run(fresh / "bin" / "moeprep", "--help", cwd=tmp_path)
    assert "card" in result.stdout


def test_card_from_a_wheel_install(fresh, converted_phimoe, tmp_path):
    out = tmp_path / "tiny-phimoe-GGUF"
    shutil.copytree(converted_phimoe, out)
    _run(fresh / "bin" / "moeprep", "card", out, cwd=tmp_path)
    assert (out / "README.md").is_file()
