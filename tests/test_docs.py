"""The teaching pages stay true to the code: every link resolves, every `file.py::name` exists, every ```python
excerpt is copied verbatim from the code, and every default a page states is the one in the trainer's Args. A renamed
function or a changed default breaks this test, not the page."""
import dataclasses
import importlib
import re

import pytest
from conftest import ROOT

TRAINERS = ["grpo", "dph_rl", "lp_reg", "rl_plus", "delta_l", "dppo"]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
CODE = sorted([*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")])


def page_id(p):
    return str(p.relative_to(ROOT))


def anchors(md: str) -> set:
    """GitHub's heading anchors: lower case, punctuation other than '-' and '_' dropped, spaces become '-'."""
    out = set()
    for h in re.findall(r"^#+\s+(.*?)\s*$", md, re.M):
        out.add(re.sub(r"[^\w\- ]", "", h.strip().lower().replace("`", "")).replace(" ", "-"))
    return out


def prose(md: str) -> str:
    """The page without its fenced blocks (a shell command in one is not a link)."""
    return re.sub(r"^```.*?^```", "", md, flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_resolves(page):
    md, bad = page.read_text(), []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(md)):
        if target.startswith(("http://", "https://")):
            if not re.match(r"https://(arxiv\.org|github\.com)/", target):
                bad.append(f"{target}: external links go to arxiv.org or github.com only")
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, bad


def defined(code: str, name: str) -> bool:
    """`name` is a top-level def/class/assignment of `code`, or `Class.method` a def inside that class."""
    cls, _, meth = name.rpartition(".")
    if cls:
        body = re.search(rf"^class {re.escape(cls)}\b.*?(?=^\S|\Z)", code, re.M | re.S)
        return bool(body and re.search(rf"^\s+def {re.escape(meth)}\(", body.group(0), re.M))
    return bool(re.search(rf"^(def|class) {re.escape(name)}\b|^{re.escape(name)}\s*[:=]", code, re.M))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_named_function_exists(page):
    bad = []
    for file, name in re.findall(r"`((?:bench/|tests/)?\w+\.py)::([\w.]+)", page.read_text()):
        if file.startswith("test_"):
            file = f"tests/{file}"
        src = ROOT / file
        if not src.exists() or not defined(src.read_text(), name):
            bad.append(f"{file}::{name}")
    assert not bad, bad


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_excerpts_are_verbatim(page):
    lines = {ln.strip() for f in CODE for ln in f.read_text().splitlines()}
    bad = []
    for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
        bad += [ln.strip() for ln in block.splitlines() if ln.strip() and ln.strip() not in lines]
    assert not bad, bad


def as_cell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@pytest.mark.parametrize("name", TRAINERS)
def test_each_trainer_has_a_page_whose_defaults_are_the_code_s(name):
    page = ROOT / "docs" / f"{name}.md"
    assert page.exists(), f"docs/{name}.md is missing"
    md = page.read_text()
    assert "| argument | default | source |" in md, "no defaults table"
    table = md.split("| argument | default | source |", 1)[1].split("\n\n", 1)[0]
    defaults = {f.name: f.default for f in dataclasses.fields(importlib.import_module(name).Args)}
    rows = re.findall(r"^\| `--(\w+)` \| ([^|]+) \|", table, re.M)
    assert rows, "the defaults table has no rows"
    bad = []
    for arg, cell in rows:
        cell = cell.strip().strip("`")
        if arg not in defaults:
            bad.append(f"--{arg}: not an argument of {name}.py")
        elif isinstance(defaults[arg], float) and not isinstance(defaults[arg], bool):
            try:
                ok = float(cell) == defaults[arg]
            except ValueError:
                ok = False
            bad += [] if ok else [f"--{arg}: page says {cell}, code {defaults[arg]}"]
        elif cell != as_cell(defaults[arg]):
            bad.append(f"--{arg}: page says {cell}, code {defaults[arg]}")
    assert not bad, bad


def test_common_page_exists():
    assert (ROOT / "docs" / "common.md").exists()
