"""Files moeprep ships beside its code, found wherever moeprep is installed.

The card template lives in the checkout's top-level templates/. pyproject.toml ships that folder in the
wheel as moeprep/templates/ (package data of `moeprep.templates`), where importlib.resources finds it.
An editable install cannot import a folder mapped there without an __init__.py (setuptools issue 4943),
so there, as in any checkout, the template is read from templates/ beside the package.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .errors import MoeprepError


def template(name: str = "model_card.md.j2") -> Path:
    """The file of a shipped template; Jinja's FileSystemLoader reads the folder it is in."""
    installed = Path(str(files("moeprep") / "templates" / name))  # a wheel install
    checkout = Path(__file__).resolve().parent.parent / "templates" / name  # a checkout, editable or not
    for path in (installed, checkout):
        if path.is_file():
            return path
    raise MoeprepError(f"moeprep's template {name} is not installed (looked in {installed.parent} and "
                       f"{checkout.parent})", "reinstall moeprep, or pass --template PATH")
