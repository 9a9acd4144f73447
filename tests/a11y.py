"""Accessibility and narrow-screen checks of a console page in a real Chromium: axe-core (bundled by
axe-playwright-python) with zero serious or critical violations, and no horizontal scrolling at
390 px wide. Each check writes its report under test-output/axe/ so the closing note can quote it."""

import json
import re

from axe_playwright_python.sync_playwright import Axe

from tests.conftest import REPO

REPORTS = REPO / "test-output" / "axe"
NARROW = {"width": 390, "height": 844}
_axe = Axe()


def check_accessible(page, name: str) -> list[dict]:
    """Run axe-core on ``page`` as it is now; fail on any serious or critical violation (each
    listed with its nodes). Returns every violation (minor and moderate ones are reported, not fatal)."""
    results = _axe.run(page)
    violations = results.response["violations"]
    REPORTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    summary = [
        {"id": v["id"], "impact": v["impact"], "help": v["help"], "nodes": [n["target"] for n in v["nodes"]]}
        for v in violations
    ]
    (REPORTS / f"{slug}.json").write_text(json.dumps({"page": name, "url": page.url, "violations": summary}, indent=1))
    bad = [v for v in summary if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: axe-core found serious or critical violations: {json.dumps(bad, indent=1)}"
    return summary


def check_narrow(page, name: str) -> None:
    """At 390 px wide the page must not scroll sideways (wide tables scroll inside their own box)."""
    size = page.viewport_size
    page.set_viewport_size(NARROW)
    try:
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{name}: at 390 px the page scrolls sideways by {overflow} px"
    finally:
        if size:
            page.set_viewport_size(size)
