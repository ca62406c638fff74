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
