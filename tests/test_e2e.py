"""A real browser (Debian's chromium through Playwright) learns a concept, generates, composes, and takes
screenshots of each tab. Skips, saying why, where no browser is installed (downloading one is not possible)."""

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from cidm.toyworld import concepts as C

NAME = "my-medic"  # the concept the browser learns
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_model_dir, tmp_path, monkeypatch):
    import app as app_module

    # the README's screenshots: CIDM_E2E_BASE_MODEL=cidm/toyworld/model CIDM_SCREENSHOTS=docs/screenshots
    monkeypatch.setenv("CIDM_BASE_MODEL", os.environ.get("CIDM_E2E_BASE_MODEL", str(tiny_model_dir)))
    if os.environ.get("CIDM_E2E_LIBRARY"):  # screenshots over a library with history (e.g. a `bench --core` one)
        monkeypatch.setenv("CIDM_LIBRARY", os.environ["CIDM_E2E_LIBRARY"])
    else:
        monkeypatch.delenv("CIDM_LIBRARY", raising=False)
    monkeypatch.setattr(app_module, "SESSIONS", tmp_path / "sessions")
    app_module._BASE.clear()
    app_module._ACTIVE.clear()
    demo = app_module.build_app()
    port = free_port()
    app_module.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                      show_error=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def open_page(p, url: str):
    """Chromium (Debian's) on `url`: (browser, page)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    return browser, page


def start_empty(page) -> None:
    """A first visit with an empty library is offered the demo library; these tests start empty."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    empty = page.get_by_role("button", name="Start empty")
    try:  # offered only where the demo was learned on the base model in use (the embedded world)
        empty.wait_for(state="visible", timeout=3_000)
        empty.click()
    except PlaywrightTimeout:
        pass


def test_browser_learns_generates_and_composes(served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    shots = Path(os.environ.get("CIDM_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    photos = []
    for i, img in enumerate(C.reference_images("medic", n=3)[0]):
        photos.append(str(tmp_path / f"medic-{i}.png"))
        Image.fromarray(img).resize((256, 256), Image.NEAREST).save(photos[-1])

    with playwright.sync_playwright() as p:
        browser, page = open_page(p, served)
        start_empty(page)
        page.get_by_role("tab", name="Learn a concept").click()
        page.locator("input[type=file]").first.set_input_files(photos)
        page.locator("#photos img").nth(2).wait_for(timeout=30_000)  # the three uploads, as thumbnails
        page.get_by_label("Name (written <name> in prompts)").fill(NAME)
        page.get_by_label("What is it? (class word)").fill("square")
        page.locator("input[type=number][aria-label^='number input for Training steps']").fill("10")
        page.get_by_role("button", name="Learn", exact=True).click()
        page.get_by_text(re.compile(r"^Learned <")).first.wait_for(timeout=120_000)
        assert f"<{NAME}>" in page.inner_text("body")
        page.screenshot(path=str(shots / "learn.png"), full_page=True)

        page.get_by_role("tab", name="Generate").click()
        prompt = page.get_by_label("Prompt (name your concepts as <name>)")
        prompt.fill(f"a photo of a <{NAME}> on a beach")
        page.get_by_role("button", name="Generate", exact=True).click()
        page.locator("[data-testid='image'] img, .gallery-item img, button.thumbnail-item img").first.wait_for(
            timeout=60_000)
        page.get_by_role("button", name="Generate", exact=True).wait_for(state="visible")
        page.wait_for_function("() => document.querySelectorAll('.pending, .generating').length === 0",
                               timeout=60_000)
        page.screenshot(path=str(shots / "generate.png"), full_page=True)

        page.get_by_role("tab", name="Compose").click()
        page.get_by_role("button", name="New canvas (with your latest concepts)").click()
        page.wait_for_timeout(1500)
        canvas = page.locator("canvas:visible").first
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.2 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.8 * box["height"], steps=8)
        page.mouse.up()
        page.get_by_role("button", name="OK", exact=True).click()  # the box's label: the concept
        page.get_by_role("button", name="Compose", exact=True).click()
        page.get_by_text(re.compile(r"^a photo of a <.+>$")).filter(visible=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "compose.png"), full_page=True)

        page.get_by_role("tab", name="Forgetting").click()
        page.get_by_role("button", name="Refresh").first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(shots / "forgetting.png"), full_page=True)

        page.get_by_role("tab", name="Library").click()
        page.get_by_role("button", name="Refresh").last.click()
        page.get_by_text(NAME, exact=True).filter(visible=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "library.png"), full_page=True)
        browser.close()
    for name in ("learn", "generate", "compose", "forgetting", "library"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def test_browser_learns_a_toy_example_with_a_live_preview(served, tmp_path):
    """One click fills the form with a toy-world concept's photos; while it learns, the status counts steps and the
    time left, and a preview of the concept appears before learning ends."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    shots = Path(os.environ.get("CIDM_SCREENSHOTS", tmp_path / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    steps = os.environ.get("CIDM_E2E_STEPS", "120")  # the tiny model learns 120 steps in a few seconds

    with playwright.sync_playwright() as p:
        browser, page = open_page(p, served)
        start_empty(page)
        page.get_by_role("tab", name="Learn a concept").click()
        page.get_by_text("medic (square)", exact=True).click()
        page.locator("#photos img").nth(4).wait_for(timeout=30_000)  # its five photos, as thumbnails
        assert page.get_by_label("Name (written <name> in prompts)").input_value() == "medic"
        assert page.get_by_label("What is it? (class word)").input_value() == "square"
        page.locator("input[type=number][aria-label^='number input for Training steps']").fill(steps)
        page.get_by_role("button", name="Learn", exact=True).click()
        page.get_by_text(re.compile(r"Step \d+ of \d+ · loss [\d.]+ · about .* left")).wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "learning.png"), full_page=True)
        page.get_by_text("step 50", exact=True).wait_for(timeout=120_000)
        assert "Learned <medic>" not in page.inner_text("body")  # the preview came before learning ended
        page.screenshot(path=str(shots / "learning-preview.png"), full_page=True)
        page.get_by_text(re.compile(r"^Learned <")).first.wait_for(timeout=300_000)
        page.get_by_text("a photo of a <medic>", exact=True).first.wait_for(timeout=120_000)  # the samples
        page.screenshot(path=str(shots / "learned.png"), full_page=True)
        browser.close()
    for name in ("learning", "learning-preview", "learned"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
