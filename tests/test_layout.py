"""The repository's own promises: every trainer has grpo.py's skeleton, and the README's line counts are true."""
import re

import pytest
from conftest import ROOT

TRAINERS = ["grpo", "dph_rl", "lp_reg", "rl_plus", "delta_l", "dppo"]
BANNERS = ["# ---- setup", "# ---- data and model", "# ---- rollout", "# ---- advantage", "# ---- update",
           "# ---- log, evaluate, checkpoint"]


@pytest.mark.parametrize("name", TRAINERS)
def test_same_section_banners_in_the_same_order(name):
    text = (ROOT / f"{name}.py").read_text()
    positions = [text.find(b) for b in BANNERS]
    assert -1 not in positions, [b for b, p in zip(BANNERS, positions) if p < 0]
    assert positions == sorted(positions)
    assert "class Args" in text and 'if __name__ == "__main__":' in text


def test_readme_line_counts_are_current():
    rows = re.findall(r"^\| `(\w+)\.py` \| [^|]+ \| (\d+) \|", (ROOT / "README.md").read_text(), re.M)
    assert sorted(n for n, _ in rows) == sorted(TRAINERS)
    for name, count in rows:
        assert len((ROOT / f"{name}.py").read_text().splitlines()) == int(count), name


def test_no_py_file_cites_a_document_outside_the_repository():
    """A reader of a forked file has only the repository: every markdown file a .py file names must exist in it (at
    the root or in docs/), and no file points into the design notes that live beside the repository."""
    outside = "shared" + "/specs"  # split so that this file does not match itself
    bad = []
    for f in sorted([*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            names = [m for m in re.findall(r"[\w./-]+\.md\b", line)
                     if not (ROOT / m).exists() and not (ROOT / "docs" / m).exists()]
            if names or outside in line:
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad)


def test_every_test_the_readme_names_exists():
    """The README's guarantees name the tests that hold them (`test_x.py::test_name`, or `::test_name` after one of
    those in the same cell): a renamed or deleted test must break this, not leave the README pointing at nothing."""
    text = (ROOT / "README.md").read_text()
    missing = []
    for cell in re.findall(r"[^|\n]*`test_\w+\.py::[^|\n]*", text):
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)(?:\[[^\]]*\])?`", cell):
            current = file or current
            src = (ROOT / "tests" / current).read_text() if (ROOT / "tests" / current).exists() else ""
            if not re.search(rf"^def {name}\(", src, re.M):
                missing.append(f"{current}::{name}")
    assert not missing, missing
