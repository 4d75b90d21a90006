"""The editor (GET /) in a real browser: Playwright driving the system Chromium (Debian's `chromium`;
Playwright's own browser download is not reachable here). Load, generate, pick, paint a mask,
inpaint, drag the frame past the picture's edge and outpaint, variations, an error shown, download.

UNCLIP_EDITOR_SCREENSHOT=docs/editor.png writes the screenshot the README shows."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (pip install -e '.[serve]')")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra pins it)")

from tests.serve_helpers import running, stack_app  # noqa: E402
from tests.stack_helpers import write_stack  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# what a headless Chromium needs on a machine with no network and no display (and as root)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no system Chromium: apt-get install chromium (Playwright's own download is not used)"
)


def _history(page) -> int:
    return page.locator("#history li").count()


def _wait_more_history(page, before: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#history li').length > {before}", timeout=60_000)


def test_the_editor_generates_inpaints_outpaints_and_downloads(tmp_path):
    stack = write_stack(tmp_path / "runs")
    with running(stack_app(stack)) as url, playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
        page.goto(f"{url}/")
        page.wait_for_function("document.getElementById('model').textContent.includes('64x64')")
        page.select_option("#size", "64x64")
        page.select_option("#count", "2")

        page.fill("#prompt", "a red circle")  # generate, then pick a candidate onto the canvas
        page.click("#generate")
        page.wait_for_selector("#candidates img >> nth=1")
        assert _history(page) == 2
        page.click("#candidates img >> nth=0")
        assert page.evaluate("window.unclipEditor.picked")

        box = page.locator("#canvas").bounding_box()  # the frame sits in the middle third
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 30, cy - 30)  # erase with the brush: the region to repaint
        page.mouse.down()
        page.mouse.move(cx + 30, cy + 30, steps=8)
        page.mouse.up()
        erased = (
            "(() => { const m = window.unclipEditor.mask; const d = m.getContext('2d')"
            ".getImageData(0, 0, m.width, m.height).data; return d.filter((v, i) => i % 4 === 3 && v > 0).length; })()"
        )
        assert page.evaluate(erased) > 50
        before = _history(page)
        page.fill("#prompt", "a yellow star")
        page.click("#edit")  # inpaint
        _wait_more_history(page, before)
        page.click("#candidates img >> nth=0")
        assert page.evaluate(erased) == 0  # placed: the brush marks in the frame are gone

        page.check("input[value=frame]")  # drag the frame a third of its width past the picture's left edge
        third = box["width"] / 9
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx - third, cy, steps=6)
        page.mouse.up()
        assert page.evaluate("window.unclipEditor.frame.x") < 64
        before = _history(page)
        page.click("#edit")  # outpaint: the frame's empty part is transparent, so it is painted
        _wait_more_history(page, before)
        page.click("#candidates img >> nth=0")
        left_of_picture = "window.unclipEditor.world.getContext('2d').getImageData(48, 80, 8, 8).data[3]"
        assert page.evaluate(left_of_picture) == 255  # the canvas grew past the old left edge

        before = _history(page)
        page.click("#variations")
        _wait_more_history(page, before)

        page.evaluate("window.unclipEditor.frame = {x: 64, y: 64}")  # nothing erased, nothing empty: refused
        page.click("#edit")
        page.wait_for_selector("#error:not([hidden])")
        assert "transparent" in page.text_content("#error")

        with page.expect_download() as download:
            page.click("#history a >> nth=0")
        made = Image.open(io.BytesIO(Path(download.value.path()).read_bytes()))
        assert json.loads(made.text["unclip"])["program"] == "unclip"  # the server's PNG, provenance and all

        shot = os.environ.get("UNCLIP_EDITOR_SCREENSHOT")
        page.screenshot(path=shot or str(tmp_path / "editor.png"), full_page=True)
        browser.close()
