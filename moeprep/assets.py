"""Files moeprep ships beside its code, found wherever moeprep is installed.

The card template lives in the checkout's top-level templates/, the calibration texts in
recipes/calibration/. pyproject.toml ships those folders in the wheel as moeprep/templates/ and
moeprep/calibration/ (package data of `moeprep.templates` and `moeprep.calibration`), where
importlib.resources finds them. An editable install cannot import a folder mapped there without an
__init__.py (setuptools issue 4943), so there, as in any checkout, the file is read from the checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from moeprep.errors import MoeprepError


def template(name: str = "model_card.md.j2") -> Path:
    """The file of a shipped template; Jinja's FileSystemLoader reads the folder it is in."""
    return _shipped("templates", "templates", name, "template", "reinstall moeprep, or pass --template PATH")


def calibration(name: str = "general-en.txt") -> Path:
    """A shipped calibration text (the demo model is trained on general-en.txt)."""
    return _shipped("calibration", "recipes/calibration", name, "calibration text", "reinstall moeprep")


def _shipped(package: str, folder: str, name: str, what: str, hint: str) -> Path:
    installed = Path(str(files("moeprep") / package / name))  # a wheel install
    checkout = Path(__file__).resolve().parent.parent / folder / name  # a checkout, editable or not
    for path in (installed, checkout):
        if path.is_file():
            return path
    raise MoeprepError(f"moeprep's {what} {name} is not installed (looked in {installed.parent} and "
                       f"{checkout.parent})", hint)
