"""The package's layout as the README's developer section states it: each concern has one owner."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moeprep"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at the top level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, id(node) in top))
            found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return found


def test_llama_cpp_is_imported_only_by_the_llama_package():
    wrong = [name for name, path in modules().items() if not name.startswith("moeprep.llama")
             and any(m == "llama_cpp" or m.startswith("llama_cpp.") for m, _ in imports(path))]
    assert wrong == []


def test_huggingface_hub_is_imported_only_by_the_hub_package():
    wrong = [name for name, path in modules().items() if not name.startswith("moeprep.hub")
             and any(m == "huggingface_hub" or m.startswith("huggingface_hub.") for m, _ in imports(path))]
    assert wrong == []


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_moeprep_modules_import_each_other_without_a_cycle():
    mods = modules()
    graph = {name: sorted({m for m, top in imports(path) if top and m in mods and m != name})
             for name, path in mods.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in graph[node]:
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if seen.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in seen and (cycle := visit(nxt, trail + [node])):
                return cycle
        seen[node] = 2
        return None

    for name in graph:
        if name not in seen and (cycle := visit(name, [])):
            raise AssertionError(" -> ".join(cycle))


def test_outside_the_cli_moeprep_imports_at_the_top():
    """The CLI imports what a command runs when it runs (fast --help); everywhere else imports are at the top, where
    a reader sees what a module depends on. The one exception names its reason on the line."""
    late = [f"{name}: {m}" for name, path in modules().items() if not name.startswith("moeprep.cli")
            for m, top in imports(path) if not top and m.split(".")[0] == "moeprep"]
    assert late == []
    reasons = [line for path in modules().values() for line in path.read_text(encoding="utf-8").splitlines()
               if "noqa: PLC0415" in line and not re.search(r"noqa: PLC0415 -- \w", line)]
    assert reasons == []
