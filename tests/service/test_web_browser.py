"""The web page end to end in headless Chromium: `likeness serve` with a tiny generator, a
thumbnail uploaded through the page, the result shown; saves a screenshot
(to $LIKENESS_SCREENSHOT, e.g. docs/web_page.png, else into the test's temp dir).

Needs Debian's ``chromium`` (/usr/bin/chromium) and ``pip install playwright``; Playwright
drives the system browser, it never downloads one. Skips with the reason otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import ROOT, running_serve, wait_until

CHROMIUM = Path(os.environ.get("LIKENESS_TEST_CHROMIUM", "/usr/bin/chromium"))
THUMBNAIL = ROOT / "docs" / "examples" / "astronaut_16.png"
SCREENSHOT_ENV = "LIKENESS_SCREENSHOT"


def browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


MISSING = browser_missing()
# Skip before the fixture starts a server and a worker for nothing.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=MISSING or ""),
]


@pytest.fixture
def served_url(tiny_weights: Path, tmp_path: Path) -> Iterator[str]:
    with running_serve(tiny_weights, tmp_path, progress_interval_seconds="0.2") as (proc, url):
        wait_until(lambda: "serving http" in proc.log(), timeout=60, what="serve", logs=proc.log)

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        # /readyz turns 200 once the worker has a heartbeat: the page's job will be claimed.
        wait_until(ready, timeout=120, interval=0.2, what="the worker", logs=proc.log)
        yield url


def test_the_page_upscales_a_thumbnail_in_headless_chromium(
    served_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import FilePayload, expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # Containers often run as root without user namespaces; no GPU either.
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served_url + "/")
            # The controls are filled from GET /labels.
            # Two choices (keep the thumbnail's race, any) and the five races.
            expect(page.locator("#race option")).to_have_count(7, timeout=10_000)
            # No result placeholders (empty images, an empty report) before there is a job.
            for placeholder in ("#results", "#res-result", "#report", "#progress-box"):
                expect(page.locator(placeholder)).to_be_hidden()
            # A rejected submission shows the API's {code, message}.
            page.set_input_files(
                "#thumbnail",
                files=FilePayload(name="notes.png", mimeType="image/png", buffer=b"not a png"),
            )
            page.click("#submit")
            expect(page.locator("#error")).to_contain_text("not_an_image", timeout=10_000)
            expect(page.locator("#results")).to_be_hidden()  # a refused request made no job
            page.select_option("#race", "Asian")
            page.select_option("select[data-attribute='Smiling']", "1")
            page.set_input_files("#thumbnail", str(THUMBNAIL))
            page.fill("#steps", "20")
            page.fill("#restarts", "2")
            page.fill("#seed", "1")
            page.click("#submit")
            expect(page.locator("#results")).to_be_visible(timeout=120_000)
            expect(page.locator("#error")).to_be_hidden()
            # The result image decoded (a broken one has naturalWidth 0): the generator's 32 px.
            page.wait_for_function(
                "document.getElementById('res-result').naturalWidth > 0", timeout=10_000
            )
            width = page.evaluate("document.getElementById('res-result').naturalWidth")
            assert width == 32
            assert "step 20/20" in page.inner_text("#progress-text")
            assert "downscale_mse" in page.inner_text("#report")
            assert page.get_attribute("#download", "href", timeout=5_000)
            shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "web_page.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert not errors, errors
        finally:
            browser.close()


def test_the_page_shows_a_photos_faces_and_upscales_the_ticked_ones(
    served_url: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.commands.test_upscale_photo_cli import astronaut_photo

    photo = tmp_path / "photo.png"
    astronaut_photo().save(photo)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served_url + "/")
            page.set_input_files("#thumbnail", str(photo))
            # POST /faces answers: one checkbox per face, the faces drawn on the photo.
            expect(page.locator("#face-picks input")).to_have_count(3, timeout=30_000)
            assert "3 face(s) found" in page.inner_text("#photo-info")
            # The API plans for the bundled 128-px generator: face 0 (an 84-px frame) is
            # already large, so it is not ticked; faces 1 and 2 are.
            assert "1 already large" in page.inner_text("#photo-info")
            assert not page.is_checked("#face-picks input[data-face='0']")
            assert "already large" in page.inner_text("#face-picks label:has(input[data-face='0'])")
            assert page.is_checked("#face-picks input[data-face='1']")
            assert page.is_checked("#face-picks input[data-face='2']")
            # Ticked by hand, the large face is upscaled all the same.
            page.check("#face-picks input[data-face='0']")
            page.uncheck("#face-picks input[data-face='1']")
            page.fill("#steps", "3")
            page.fill("#restarts", "1")
            page.click("#submit")
            expect(page.locator("#photo-results")).to_be_visible(timeout=120_000)
            expect(page.locator("#error")).to_be_hidden()
            # Faces 0 and 2: each with its aligned thumbnail and its upscaled face.
            expect(page.locator("#res-faces img")).to_have_count(4)
            expect(page.locator("#photo-report tbody tr")).to_have_count(2)
            page.wait_for_function(
                "document.getElementById('res-composite').naturalWidth >= 400", timeout=10_000
            )
            shot = Path(os.environ.get("LIKENESS_PHOTO_SCREENSHOT") or tmp_path / "photo.png")
            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
