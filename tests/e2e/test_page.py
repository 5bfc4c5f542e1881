"""The web page in real Chromium: the demo video, its clips, a regeneration with live progress."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import missing
from tests.e2e.conftest import RunningClipChat
from tests.e2e.test_embedded import demo_job

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        missing("Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        yield browser
        browser.close()


def test_page_regenerates_a_clip_with_live_progress(embedded: RunningClipChat, browser, tmp_path: Path) -> None:
    job = demo_job(embedded)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{embedded.url}/")
    page.wait_for_selector("#workspace:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#clips .clip').length >= 6")
    video_src = page.get_attribute("#video", "src")
    assert video_src and "/media/" in video_src
    page.screenshot(path=str(tmp_path / "before.png"))

    page.locator("#clips .clip").nth(4).click()
    page.fill("#instruction", "make it snowy")
    page.click("#regenerate")
    page.wait_for_selector("#progress-box:not([hidden])")
    page.screenshot(path=str(tmp_path / "running.png"))
    page.wait_for_function(f"document.querySelector('#video').getAttribute('src') !== {video_src!r}",
                           timeout=180_000)
    page.wait_for_function("document.querySelectorAll('#history li').length >= 1")
    history = page.inner_text("#history")
    assert "snow" in history.lower()
    assert "no LLM used" in history  # the page says honestly how the prompt was written
    page.screenshot(path=str(tmp_path / "after.png"))
    versions = page.locator("#versions li").count()
    assert versions >= 2
    assert not errors, errors
    with embedded.client() as client:
        after = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert after["current_version"] > job["current_version"]
    assert "snow" in after["clips"][4]["prompt"]
