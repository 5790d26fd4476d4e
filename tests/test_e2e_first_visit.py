"""A first visit in a real browser (Debian's chromium through Playwright), on the embedded world: start from the
shipped demo library, compose the two concepts already in boxes, look at the forgetting grid. Reports the time from
opening the page to the first composed image; with CIDM_SCREENSHOTS set, saves the README's screenshots."""

import os
import re
import time
from pathlib import Path

import pytest

from cidm.demo import DEMO_LIBRARY
from cidm.models import EMBEDDED_MODEL
from test_e2e import CHROMIUM, free_port, open_page

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install chromium")


@pytest.fixture
def served(tmp_path, monkeypatch):
    import app as app_module

    monkeypatch.setenv("CIDM_BASE_MODEL", str(EMBEDDED_MODEL))
    monkeypatch.delenv("CIDM_LIBRARY", raising=False)
    monkeypatch.setattr(app_module, "SESSIONS", tmp_path / "sessions")
    app_module._BASE.clear()
    app_module._ACTIVE.clear()
    app_module.base()  # the model loads once per server, before the first visitor
    demo = app_module.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True,
                css=app_module.CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_first_visit_starts_from_the_demo_library_composes_and_shows_the_forgetting_grid(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    assert (DEMO_LIBRARY / "library.json").is_file(), "the demo library is shipped (python -m cidm demo)"
    shots = Path(os.environ.get("CIDM_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in DEMO_LIBRARY.rglob("*"))

    with playwright.sync_playwright() as p:
        t0 = time.perf_counter()
        browser, page = open_page(p, served)
        start = page.get_by_role("button", name="Start from the demo library (10 concepts)")
        start.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "first-visit.png"))
        start.click()
        page.get_by_text("Your library now holds the demo's 10 concepts", exact=False).wait_for(timeout=30_000)
        assert not start.is_visible()

        page.get_by_role("tab", name="Compose").click()
        page.get_by_role("button", name="Compose", exact=True).click()  # the two boxes are already drawn
        page.get_by_text(re.compile(r"^a photo of a <.+>$")).filter(visible=True).first.wait_for(timeout=60_000)
        first_composed = time.perf_counter() - t0
        page.screenshot(path=str(shots / "compose.png"), full_page=True)

        page.get_by_role("tab", name="Forgetting").click()
        page.get_by_text("after task 10 (IA / TA)").first.wait_for(timeout=30_000)  # the table, then the grid
        page.wait_for_function("() => [...document.querySelectorAll('img')].some(i => i.naturalWidth > 1000)",
                               timeout=30_000)  # 110 + 10 × 96 px wide
        page.screenshot(path=str(shots / "forgetting.png"), full_page=True)
        browser.close()
    print(f"\nfrom opening the page to the first composed image: {first_composed:.1f} s")
    assert sorted(p.name for p in DEMO_LIBRARY.rglob("*")) == before  # the visitor's copy changed, not the shipped
    for name in ("first-visit", "compose", "forgetting"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
