"""The demo's measured numbers appear in one place only (issue 16 item 13).

``getting-started.md``/``training.md`` gave the demo as 12.5% → 76.6% while ``concepts.md`` gave 14% → 78%
for the same configuration: numbers typed twice drift. The measured run lives in ``docs/demo.md``'s
table (from one ``summary.json``); this test reads the percentages and the held-out losses of that
table and asserts that no other page repeats them.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _demo_numbers() -> set[str]:
    text = (DOCS / "demo.md").read_text()
    table = text[text.index("## A measured run"):]
    table = table[: table.index("\n\n", table.index("|"))]
    rows = [r for r in table.splitlines() if r.startswith("|") and ("dog" in r or "held-out" in r)]
    nums = set()
    for row in rows:
        nums |= set(re.findall(r"\d+\.\d+%?", row))
    return nums


def test_demo_numbers_live_only_in_the_demo_page():
    nums = _demo_numbers()
    assert {"12.5%", "59.4%", "5.61"} <= nums                     # the table was read
    for page in DOCS.rglob("*.md"):
        if page.name == "demo.md":
            continue
        text = page.read_text()
        found = sorted(n for n in nums if re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text))
        assert not found, f"{page.relative_to(DOCS)} repeats the demo's numbers {found}; link to demo.md instead"
