"""The card lint: what must hold before a card may be pushed.

The card is rendered again from the manifest beside it, with the options the manifest records for it
(`Manifest.card`), and both are parsed as a reader's Markdown viewer parses them (markdown-it-py, CommonMark and
GitHub's tables): every front-matter field, heading, paragraph, list item, table cell and code block must be the
manifest's, in order, and nothing else may be there. An HTML comment that hides a table, raw HTML, a second table
or one whose header differs by a space are all differences. Cheap checks that explain the common defects come
first (merge markers, unrendered template syntax, empty cells, placeholders, links that would 404 on the Hub),
and every file the card lists must be beside it with the bytes the manifest records.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from markdown_it import MarkdownIt

from moeprep.card.layout import repos
from moeprep.card.render import render
from moeprep.files import matches
from moeprep.inputs import load_yaml, read_text, short
from moeprep.limits import MAX_CARD, MAX_TEMPLATE
from moeprep.records import manifest as mf
from moeprep.records.manifest import Manifest

REQUIRED = ["base_model", "base_model_relation", "license", "tags", "quantized_by"]
MAX_PROBLEMS = 20
_MARKER = re.compile(r"^(<{7}( .*)?|={7}|>{7}( .*)?)$")
_LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)|(?:src|href)=\"([^\"]+)\"")
_PLACEHOLDER = re.compile(r"\((add|tbd|todo)\)", re.IGNORECASE)


def lint(path: Path, manifest: Manifest | None = None, check_files: bool = True, template: Path | None = None
         ) -> list[str]:
    """Problems with the card at `path`; an empty list means it may be pushed."""
    path = Path(path)
    text = read_text(path, MAX_CARD, "card", "render it with `moeprep card DIR` first")
    if manifest is None:
        manifest = mf.load_or_none(path.parent)
    return lint_text(text, path, manifest, check_files, template)


def lint_text(text: str, path: Path, manifest: Manifest | None, check_files: bool = False,
              template: Path | None = None) -> list[str]:
    problems = _static(text) + _front_matter(text) + _links(text.splitlines(), path.parent)
    if manifest is None:
        return problems + ["no manifest.json beside the card: its figures and checksums cannot be verified"]
    problems += [f"manifest: {p}; convert again" for p in manifest.chain_problems()]
    if manifest.card is None:
        return problems + ["the manifest records no card rendered from it: render it with `moeprep card DIR`"]
    expected, why = _rendered_again(manifest, path.name, text, template)
    if expected is None:
        return problems + [why]
    problems += compare(expected, text)
    if check_files:
        problems += _files(manifest, expected, path.parent)
    return problems[:MAX_PROBLEMS] + ([f"and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else [])


def _rendered_again(m: Manifest, name: str, text: str, template: Path | None) -> tuple[str | None, str]:
    """The card the manifest gives for this file name (for per-quant repos, the one its text is closest to)."""
    record = m.card
    if record is None:
        return None, "the manifest records no card rendered from it: render it with `moeprep card DIR`"
    if record.template and not record.template_sha256:  # a path alone proves nothing: any file could be read
        return None, (f"the manifest names the card template {short(record.template)} without its sha256, so the "
                      "card cannot be checked against it: render the card again with `moeprep card`")
    template = Path(template) if template else Path(record.template) if record.template else None
    if record.template_sha256:
        if template is None:
            return None, "the card was rendered with a template that is not named: pass --template"
        try:
            data = read_text(template, MAX_TEMPLATE, "card template", "")
        except Exception:
            return None, (f"the card was rendered with the template {record.template} (sha256 "
                          f"{record.template_sha256[:12]}…), which is not here to render it again: pass --template")
        if hashlib.sha256(data.encode()).hexdigest() != record.template_sha256:
            return None, f"the template {template} is not the one the card was rendered with (sha256 differs)"
    cards = repos(m, record.repo_id, record.layout)
    named = [r for r in cards if r.card == name]
    candidates = [render(m, r, record, template) for r in (named or cards)]
    best = max(candidates, key=lambda c: difflib.SequenceMatcher(None, c, text, autojunk=False).quick_ratio())
    return best, ""


# --- what a reader sees ---------------------------------------------------------------------------------------

@dataclass
class Block:
    kind: str  # heading, paragraph, list item, quote, table, code, html, rule
    line: int
    content: Any  # text; for a table its rows of cells (list[list[str]]); for code (info, text)
    where: str = ""  # the heading it is under
    html: bool = False  # inline HTML in it

    def key(self) -> tuple:
        return (self.kind, repr(self.content), self.html)

    def describe(self) -> str:
        if self.kind == "table":
            return f"a table under {self.where!r} headed {' | '.join(self.content[0]) if self.content else ''!r}"
        if self.kind == "code":
            return f"a code block ({self.content[0] or 'no language'})"
        if self.kind == "html":
            return f"HTML {short(str(self.content).strip(), 50)}"
        return f"the {self.kind} {short(str(self.content), 70)}"


def split_front_matter(text: str) -> tuple[str | None, str, int]:
    """(front matter, body, the body's first line number)."""
    if not text.startswith("---\n"):
        return None, text, 1
    end = text.find("\n---\n", 4)
    if end < 0:
        return None, text, 1
    return text[4:end], text[end + 5:], text[:end + 5].count("\n") + 1


def blocks(text: str) -> list[Block]:
    _, body, first = split_front_matter(text)
    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(body)
    out: list[Block] = []
    containers: list[str] = []
    heading = ""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        line = (t.map[0] + first) if t.map else 0
        if t.type in ("bullet_list_open", "ordered_list_open", "list_item_open", "blockquote_open"):
            containers.append(t.type)
        elif t.type in ("bullet_list_close", "ordered_list_close", "list_item_close", "blockquote_close"):
            containers.pop()
        elif t.type == "heading_open":
            inline = tokens[i + 1]
            heading = inline.content
            out.append(Block(f"heading {t.tag}", line, inline.content, heading, _has_html(inline)))
            i += 2
        elif t.type == "paragraph_open":
            inline = tokens[i + 1]
            kind = ("list item" if "list_item_open" in containers else
                    "quote" if "blockquote_open" in containers else "paragraph")
            out.append(Block(kind, line, inline.content, heading, _has_html(inline)))
            i += 2
        elif t.type == "table_open":
            rows: list[list[str]] = []
            html = False
            i += 1
            while tokens[i].type != "table_close":
                if tokens[i].type == "tr_open":
                    rows.append([])
                elif tokens[i].type == "inline":
                    rows[-1].append(tokens[i].content.strip())
                    html = html or _has_html(tokens[i])
                i += 1
            out.append(Block("table", line, rows, heading, html))
        elif t.type in ("fence", "code_block"):
            out.append(Block("code", line, (t.info.strip(), t.content), heading))
        elif t.type == "html_block":
            out.append(Block("html", line, t.content, heading, True))
        elif t.type == "hr":
            out.append(Block("rule", line, "", heading))
        i += 1
    return out


def _has_html(inline) -> bool:
    return any(child.type == "html_inline" for child in inline.children or [])


def compare(expected: str, actual: str) -> list[str]:
    """Every difference a reader would see between the card the manifest gives and this one, in order."""
    problems = _compare_front_matter(expected, actual)
    want, got = blocks(expected), blocks(actual)
    matcher = difflib.SequenceMatcher(None, [b.key() for b in want], [b.key() for b in got], autojunk=False)
    for op, w0, w1, g0, g1 in matcher.get_opcodes():
        if op == "equal":
            continue
        if op == "replace" and w1 - w0 == g1 - g0:
            for w, g in zip(want[w0:w1], got[g0:g1], strict=True):
                problems += _differ(w, g)
            continue
        for g in got[g0:g1]:
            what = ("HTML (a comment or raw HTML), which moeprep never writes there" if g.kind == "html"
                    else f"{g.describe()}, which the manifest does not give")
            problems.append(f"line {g.line}: {what}")
        for w in want[w0:w1]:
            problems.append(f"{w.describe()} is missing (it belongs under {w.where!r})")
    if not problems and (difference := _first_line_difference(expected, actual)):
        # what the blocks above do not show still renders, or hides in the source: a quote or list around a
        # block, a column's alignment, a link reference, a cell past the header, a key given twice, a hard break
        problems.append(difference)
    return problems


def _first_line_difference(expected: str, actual: str) -> str | None:
    """The first line that differs, blank lines aside (a reader does not see how many separate two blocks)."""
    want = [(n, line) for n, line in enumerate(expected.splitlines(), 1) if line.strip()]
    got = [(n, line) for n, line in enumerate(actual.splitlines(), 1) if line.strip()]
    for (_, w), (n, g) in zip(want, got, strict=False):
        if w != g:
            return f"line {n} is {short(g, 90)}; the manifest gives {short(w, 90)}"
    if len(got) > len(want):
        return f"line {got[len(want)][0]}: {short(got[len(want)][1], 90)}, which the manifest does not give"
    if len(got) < len(want):
        return f"the card ends before {short(want[len(got)][1], 90)}, which the manifest gives next"
    return None


def _differ(want: Block, got: Block) -> list[str]:
    at = f"line {got.line}"
    if got.html and not want.html:
        return [f"{at}: inline HTML in {got.describe()}, which moeprep never writes"]
    if want.kind != got.kind:
        return [f"{at}: {got.describe()} stands where the manifest gives {want.describe()}"]
    if want.kind == "table":
        w, g = want.content, got.content
        if w[0] != g[0]:
            return [f"{at}: a table under {got.where!r} has the header {' | '.join(g[0])!r}; the manifest gives "
                    f"{' | '.join(w[0])!r}"]
        problems = []
        for row_w, row_g in zip(w[1:], g[1:], strict=False):
            for col, cw, cg in zip(w[0], row_w, row_g, strict=False):
                if cw != cg:
                    problems.append(f"{at}: table {got.where!r}, row {row_w[0]!r}: {col} is {short(cg)}, the manifest "
                                    f"says {short(cw)}")
            if len(row_w) != len(row_g):
                problems.append(f"{at}: table {got.where!r}, row {row_w[0]!r} has {len(row_g)} cells, not {len(row_w)}")
        if len(w) != len(g):
            problems.append(f"{at}: table {got.where!r} lists {', '.join(r[0] for r in g[1:]) or 'nothing'}; the "
                            f"manifest gives {', '.join(r[0] for r in w[1:]) or 'nothing'}")
        return problems
    return [f"{at}: {got.describe()} differs from what the manifest gives: {want.describe()}"]


def _compare_front_matter(expected: str, actual: str) -> list[str]:
    want_text, _, _ = split_front_matter(expected)
    got_text, _, _ = split_front_matter(actual)
    try:
        want, got = load_yaml(want_text or ""), load_yaml(got_text or "")
    except yaml.YAMLError:
        return []  # reported by _front_matter
    if not isinstance(want, dict) or not isinstance(got, dict):
        return []
    problems = []
    for key, value in want.items():
        if key not in got:
            problems.append(f"front matter: {key} is missing; the manifest gives {short(value)}")
        elif got[key] != value:
            problems.append(f"front matter: {key} is {short(got[key])}, the manifest gives {short(value)}")
    problems += [f"front matter: {short(key)} is a field the manifest does not give" for key in got if key not in want]
    return problems


# --- cheap checks, with the messages people understand -----------------------------------------------------

def _static(text: str) -> list[str]:
    problems = []
    fence = None  # the fence of the code block the line is in: a chat template there is the model's text
    for n, line in enumerate(text.splitlines(), 1):
        if _MARKER.match(line):
            problems.append(f"line {n}: merge-conflict marker {line[:7]!r}")
        if m := re.match(r"^(`{3,})", line):
            fence = None if fence and m.group(1) == fence and not line[len(fence):].strip() else fence or m.group(1)
            continue
        if fence:
            continue
        if "{{" in line or "{%" in line:
            problems.append(f"line {n}: unrendered template syntax")
        if line.strip().startswith("|") and not re.fullmatch(r"\|[\s|:-]*\|", line.strip()):
            if any(c == "" for c in _cells(line)):
                problems.append(f"line {n}: empty table cell")
        if m := _PLACEHOLDER.search(line):
            problems.append(f"line {n}: placeholder {m.group(0)}")
    return problems


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _front_matter(text: str) -> list[str]:
    if not text.startswith("---\n"):
        return ["front matter: the card does not start with a YAML block (---)"]
    front, _, _ = split_front_matter(text)
    if front is None:
        return ["front matter: no closing --- line"]
    try:
        meta = load_yaml(front)
    except yaml.YAMLError as e:
        return [f"front matter: not valid YAML ({str(e).splitlines()[0][:100]})"]
    if not isinstance(meta, dict):
        return ["front matter: not a mapping"]
    problems = [f"front matter: missing {key}" for key in REQUIRED if not meta.get(key)]
    if meta.get("base_model_relation") not in (None, "quantized"):
        problems.append("front matter: base_model_relation must be quantized")
    if not isinstance(tags := meta.get("tags"), list) or "gguf" not in tags:
        problems.append("front matter: tags lack gguf")
    return problems


def _links(lines: list[str], folder: Path) -> list[str]:
    problems = []
    for n, line in enumerate(lines, 1):
        for m in _LINK.finditer(line):
            url = m.group(1) or m.group(2)
            if re.match(r"^(https?://|mailto:|#)", url):
                continue
            if not url.startswith(("/", "..")) and (folder / url).is_file():
                continue  # a file of this repo, uploaded beside the card
            problems.append(f"line {n}: relative link {url!r} does not resolve on the Hub; "
                            "link other repos as absolute https://huggingface.co/ORG/NAME URLs")
    return problems


def _files(m: Manifest, card: str, folder: Path) -> list[str]:
    """Every file the card lists is beside it, with the bytes the manifest records."""
    listed = {row[0] for b in blocks(card) if b.kind == "table" and b.content and b.content[0][:1] == ["File"]
              for row in b.content[1:]}
    problems = []
    for a in m.artifacts:
        files = [(a.path, a.size, a.sha256, a.mtime_ns)] if not a.shards else \
            [(s.path, s.size, s.sha256, s.mtime_ns) for s in a.shards]
        for path, size, sha, mtime in files:
            if path not in listed:
                continue
            local = folder / path
            if not local.is_file():
                problems.append(f"file table: {path} does not exist beside the card")
            elif not matches(local, size, sha, mtime):
                problems.append(f"file table: {path} does not have the sha256 the card lists")
    return problems
