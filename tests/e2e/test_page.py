"""The web page in real Chromium, at a desktop and a phone width, against ``clipchat up``.

One embedded system for the module (``clipchat up --no-demo``) with one six-clip job of 1-second
clips uploaded through the API (the demo's six 4-second clips would make every composition four
times longer, and the demo itself is checked in test_embedded), its video generator the fake
prediction API (scripted per test: a refused prompt, a prediction that never finishes); one browser
for the module, a fresh context per test. Every flow asserts no console errors, no failed requests and, on the phone, no
horizontal scrolling; each state is saved as a screenshot (the folder is printed at the end).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import free_port, missing
from tests.e2e.conftest import (
    CLIPCHAT,
    SCREENSHOTS_KEY,
    TOKEN,
    base_env,
    start_process,
    wait_for_job,
    wait_until,
)
from tests.fakes.prediction_server import PredictionServer
from tests.processes import stop_process

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GENERATOR_TOKEN = "page-generator-token"
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
# Which clip each width changes, so the two runs of a flow do not share a thread.
CLIP = {"desktop": 1, "phone": 2}
SLOW = 180_000  # ms: a readiness wait for a regeneration (not a speed check)
# The page's job: six 1-second clips of bright colours (plainly not the dark generated one in a
# before/after), with a test pattern in a corner so that each looks like a picture.
JOB_CLIPS = {"gold": "0xffd54f", "sky": "0x81d4fa", "coral": "0xff8a65", "mint": "0xa5d6a7",
             "lilac": "0xce93d8", "sand": "0xffe0b2"}
CLIP_SECONDS = 1

# Records what the page showed between two checks: the stages, the badge, a typing indicator,
# the skeletons before the clips arrived.
RECORDER = """
window.__seen = {stages: [], badges: [], typing: false, skeletons: 0, connection: [], clipRuns: []};
document.addEventListener("DOMContentLoaded", () => {
  window.__seen.skeletons = document.querySelectorAll("#clips .clip-skeleton").length;
});
new MutationObserver(() => {
  const seen = window.__seen;
  const stage = document.getElementById("run-stage");
  if (stage && stage.textContent && seen.stages[seen.stages.length - 1] !== stage.textContent) {
    seen.stages.push(stage.textContent);
  }
  const badge = document.getElementById("job-status");
  if (badge && badge.textContent && seen.badges[seen.badges.length - 1] !== badge.textContent) {
    seen.badges.push(badge.textContent);
  }
  if (document.querySelector("#thread .typing")) seen.typing = true;
  for (const run of document.querySelectorAll("#thread .clip-run")) {  // a clip's own bar in a change
    const entry = [run.dataset.member, run.querySelector(".clip-run-stage").textContent,
                   run.querySelector("progress").value, Boolean(document.getElementById("run-progress"))];
    const last = seen.clipRuns[seen.clipRuns.length - 1];
    if (!last || last.join() !== entry.join()) seen.clipRuns.push(entry);
  }
  const connection = document.getElementById("connection");
  if (connection && !connection.hidden && seen.connection[seen.connection.length - 1] !== connection.textContent) {
    seen.connection.push(connection.textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true,
                     attributeFilter: ["value"]});
"""


@dataclass
class PageSystem:
    url: str
    predictions: PredictionServer
    output: list[str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def job(self) -> dict[str, Any]:
        """The six-clip job (the oldest)."""
        with self.client() as client:
            job_id = client.get("/api/v1/jobs").json()["jobs"][-1]["id"]
            job: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
            return job


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, ffmpeg_exe: str) -> Iterator[PageSystem]:
    """``clipchat up`` with a six-clip job, generating through the fake prediction API."""
    data_dir = tmp_path_factory.mktemp("page")
    night = data_dir / "night.mp4"
    # A dark frame with a light square: plainly not the job's bright clips in a before/after.
    _render(ffmpeg_exe, night, f"color=c=0x0b1030:s=640x360:r=25:d={CLIP_SECONDS},"
                               "drawbox=x=420:y=60:w=90:h=90:color=0xf0f0ff:t=fill")
    # The fake provider bills $0.20 for a 1 s clip, and the settings quote what it bills.
    predictions = PredictionServer(video=night, token=GENERATOR_TOKEN, cost="0.20", steps=3)
    predictions.start()
    env = base_env(data_dir)
    env.update({
        "CLIPCHAT_GENERATOR": "http", "CLIPCHAT_GENERATOR_URL": predictions.url,
        "CLIPCHAT_GENERATOR_API_TOKEN": GENERATOR_TOKEN, "CLIPCHAT_GENERATOR_MODEL": "fake/video-1",
        "CLIPCHAT_GENERATION_PRICE_PER_SECOND": "0.20",
        "CLIPCHAT_GENERATOR_POLL_INITIAL_SECONDS": "0.3", "CLIPCHAT_GENERATOR_POLL_MAX_SECONDS": "0.5",
        "CLIPCHAT_X264_PRESET": "superfast", "CLIPCHAT_RATE_LIMIT_PER_MINUTE": "10000",
        "CLIPCHAT_SSE_HEARTBEAT_SECONDS": "1",
    })
    output: list[str] = []
    proc = start_process([CLIPCHAT, "up", "--no-demo", "--port", str(free_port())], env, output)
    try:
        wait_until(lambda: any("ClipChat is running" in line for line in output), "clipchat up", [proc], output)
        url = next(line for line in output if "ClipChat is running" in line).split("running:")[1].strip().rstrip("/")
        page_system = PageSystem(url, predictions, output)
        _create_job(page_system, data_dir / "job", ffmpeg_exe)
        yield page_system
    finally:
        stop_process(proc)
        predictions.stop()


def _render(ffmpeg_exe: str, dest: Path, source: str) -> None:
    """Render the lavfi ``source`` to an H.264 MP4 at ``dest``."""
    subprocess.run([ffmpeg_exe, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                    "-i", source, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(dest)],
                   check=True, capture_output=True, timeout=60)


def _create_job(system: PageSystem, folder: Path, ffmpeg_exe: str) -> str:
    """Upload the six-clip job (``POST /jobs``) and wait for its first version; returns its id."""
    folder.mkdir()
    clips = []
    for index, colour in enumerate(JOB_CLIPS.values()):
        clips.append(folder / f"clip{index}.mp4")
        _render(ffmpeg_exe, clips[-1], f"color=c={colour}:s=640x360:r=25:d={CLIP_SECONDS},"
                                       f"drawbox=x={40 + 90 * index}:y=40:w=80:h=80:color=0x202020:t=fill")
    seconds = CLIP_SECONDS * len(JOB_CLIPS)
    music = folder / "music.m4a"
    subprocess.run([ffmpeg_exe, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"sine=frequency=220:sample_rate=48000:duration={seconds}", "-c:a", "aac", str(music)],
                   check=True, capture_output=True, timeout=60)
    manifest = {"title": "Page flows", "aspect_ratio": "16:9",
                "clips": [{"prompt": f"a {name} sky over a city rooftop on a sunny afternoon",
                           "duration": CLIP_SECONDS} for name in JOB_CLIPS],
                "transitions": [{"kind": "cut", "duration": 0}] * (len(JOB_CLIPS) - 1),
                "beat_timestamps": [0.5 * beat for beat in range(2 * seconds)]}
    files = [("clips", (clip.name, clip.read_bytes(), "video/mp4")) for clip in clips]
    files.append(("audio", (music.name, music.read_bytes(), "audio/mp4")))
    with system.client() as client:
        created = client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)}, files=files)
        assert created.status_code == 202, created.text
        job = wait_for_job(client, created.json()["id"], {"completed", "failed"})
    assert job["status"] == "completed", (job, "".join(system.output[-40:]))
    return str(job["id"])


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        missing("Chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync", "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "page-screenshots"
    folder.mkdir(exist_ok=True)
    request.config.stash[SCREENSHOTS_KEY] = folder
    return folder


@dataclass
class Watched:
    """A page with what went wrong on it: console errors, page errors, failed requests."""

    page: Any
    width: str
    shots: Path
    flow: str
    allowed_statuses: set[int]
    allowed_failure: str | None = None  # a network error this flow causes on purpose
    allowed_paths: frozenset[str] = frozenset()  # URLs (paths) this flow makes fail on purpose
    problems: list[str] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)  # event-stream requests held back
    documents: int = 0  # how many times the test reloaded the page
    reloading: bool = False  # asked to reload, the new document not yet committed
    document_of: dict[int, int] = field(default_factory=dict)  # request → the document that sent it
    estimates: list[str] = field(default_factory=list)  # the estimate requests the page made

    def reload(self) -> None:
        """Reload the page; what the old document still had in flight is aborted by the browser,
        including what it sends until the new document commits."""
        self.documents += 1
        self.reloading = True
        self.page.reload()

    def shot(self, state: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{self.flow}-{state}-{self.width}.png"), full_page=True)
        self.assert_fits()

    def assert_fits(self) -> None:
        if self.width == "phone":
            widths = self.page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
            assert widths[0] <= widths[1], f"the page scrolls sideways at {widths[1]} px: {widths[0]} px wide"

    def assert_clean(self) -> None:
        assert not self.problems, self.problems


def _open(browser: Any, system: PageSystem, shots: Path, width: str, flow: str, *,
          allowed_statuses: frozenset[int] = frozenset(), hold_events: bool = False,
          drop_first_stream: bool = False, job_id: str | None = None,
          allowed_paths: frozenset[str] = frozenset(), prepare: Any = None) -> Watched:
    """A fresh page on the six-clip job (or ``job_id``), its clips shown. ``hold_events`` holds its event stream back,
    as when another tab's change has not reached it yet; ``drop_first_stream`` resets the first
    event-stream connection, as a network that drops; ``prepare`` is called with the page before it
    loads (routes, init scripts), and requests to ``allowed_paths`` may fail (the flow fails them)."""
    context = browser.new_context(viewport=VIEWPORTS[width])
    context.add_init_script(RECORDER)
    page = context.new_page()
    watched = Watched(page, width, shots, flow, set(allowed_statuses),
                      "net::ERR_CONNECTION_RESET" if drop_first_stream else None, allowed_paths)
    streams: list[Any] = []

    def events(route: Any) -> None:
        streams.append(route)
        if hold_events:
            return
        if drop_first_stream and len(streams) == 1:
            route.abort("connectionreset")
        elif not drop_first_stream or len(streams) > 2:
            route.continue_()  # (the second one waits for the test)

    if hold_events or drop_first_stream:
        watched.held = streams
        page.route("**/api/v1/jobs/*/events?*", events)

    def console(message: Any) -> None:
        if message.type != "error" or any(f"status of {s}" in message.text for s in watched.allowed_statuses):
            return
        if _path(message.location.get("url")) in watched.allowed_paths:
            return
        if watched.allowed_failure and watched.allowed_failure in message.text:
            return
        watched.problems.append(f"console: {message.text}")

    def failed(request: Any) -> None:
        # A video element aborts its range requests as it seeks, a closing page its event stream,
        # and a reload whatever the old document had in flight.
        if request.failure == "net::ERR_ABORTED" and (
                request.resource_type in {"media", "eventsource"}
                or watched.document_of.get(id(request), watched.documents) < watched.documents):
            return
        if watched.allowed_failure and request.failure == watched.allowed_failure:
            return
        if _path(request.url) in watched.allowed_paths:
            return
        watched.problems.append(f"request failed: {request.url} {request.failure}")

    def response(resp: Any) -> None:
        if _path(resp.url) in watched.allowed_paths:
            return
        if resp.status >= 400 and resp.status not in watched.allowed_statuses:
            watched.problems.append(f"HTTP {resp.status}: {resp.url}")

    page.on("console", console)
    page.on("pageerror", lambda exc: watched.problems.append(f"page error: {exc}"))

    def request(request: Any) -> None:
        # Until the new document commits, a request is the old document's (the reload aborts it).
        watched.document_of[id(request)] = watched.documents - 1 if watched.reloading else watched.documents
        if "/estimate?" in request.url:
            watched.estimates.append(request.url)

    def navigated(frame: Any) -> None:
        if frame == page.main_frame:
            watched.reloading = False

    page.on("request", request)
    page.on("framenavigated", navigated)
    page.on("requestfailed", failed)
    page.on("response", response)
    if prepare is not None:
        prepare(page)
    page.goto(f"{system.url}/#job={job_id or system.job()['id']}")
    page.wait_for_function(f"document.querySelectorAll('#clips .clip').length >= {1 if job_id else 6}")
    return watched


def wait_until_true(probe: Any, page: Any) -> None:
    """Poll ``probe`` while the page runs (a readiness wait, not a speed check)."""
    for _ in range(600):
        if probe():
            return
        page.wait_for_timeout(100)
    pytest.fail("the page did not get there")


def _path(url: str | None) -> str:
    return urlsplit(url or "").path


def _select(page: Any, index: int) -> None:
    page.locator("#clips .clip").nth(index).click()
    page.wait_for_function(f"document.querySelectorAll('#clips .clip')[{index}].ariaPressed === 'true'")


def _send(page: Any, instruction: str) -> None:
    page.fill("#instruction", instruction)
    page.click("#send")


# WCAG AA: the text of these elements against the colour behind them, at least 4.5:1.
CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).slice(0, 4).map(Number);
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => {
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const behind = (node) => { for (let n = node; n; n = n.parentElement) {
      const c = rgb(getComputedStyle(n).backgroundColor); if (c.length === 3 || c[3] > 0) return c; }
    return [255, 255, 255]; };
  const out = [];
  for (const sel of ["h1", "#job-title", ".hint", ".clip-index", ".clip-duration", ".clip-prompt", "#send",
                     ".badge", "label", ".usage-table th", ".usage-table caption", ".usage-value", ".empty-thread",
                     ".version-text"]) {
    for (const node of document.querySelectorAll(sel)) {
      if (!node.offsetParent) continue;
      const a = lum(rgb(getComputedStyle(node).color)), b = lum(behind(node));
      out.push([sel, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]);
    }
  }
  return out;
}"""


def assert_contrast(page: Any) -> None:
    ratios = page.evaluate(CONTRAST)
    assert ratios, "nothing measured"
    low = [(selector, round(ratio, 2)) for selector, ratio in ratios if ratio < 4.5]
    assert not low, f"text below 4.5:1 contrast: {low}"


def money(value: str) -> str:
    """A decimal string as the page writes an amount: cents, or four places under a cent."""
    amount = float(value)
    return f"${amount:.4f}" if 0 < amount < 0.01 else f"${amount:.2f}"


def assert_estimate_shown(page: Any, system: PageSystem, clips: list[int], job_id: str | None = None) -> dict[str, Any]:
    """The composer shows the API's estimate of a change of ``clips`` (before anything is sent); returns it."""
    with system.client() as client:
        answer = client.get(f"/api/v1/jobs/{job_id or system.job()['id']}/estimate",
                            params={"clips": ",".join(map(str, clips))})
        assert answer.status_code == 200, answer.text
        estimate: dict[str, Any] = answer.json()
    page.wait_for_function("(cost) => document.getElementById('estimate').dataset.cost === cost",
                           arg=estimate["estimated_cost"])
    text = page.inner_text("#estimate")
    if estimate["within_budget"]:
        assert text.startswith(f"Estimated cost about {money(estimate['estimated_cost'])} "
                               f"({money(estimate['budget_left'])} of the budget left)."), (text, estimate)
    return estimate


def assert_usage_shown(page: Any, system: PageSystem) -> None:
    """The usage chart beside the budget shows the job's usage as the API reports it, once a change is done:
    each step that was paid a non-zero bar and figure, and the count of completed changes."""
    with system.client() as client:
        usage = client.get(f"/api/v1/jobs/{system.job()['id']}/usage").json()
    completed = usage["changes"]["completed"]
    assert completed >= 1 and float(usage["spend_by_step"]["generate"]) > 0, usage
    page.wait_for_function("(n) => document.querySelector('#usage-changes tr[data-item=completed]')"
                           "?.dataset.value === String(n)", arg=completed)
    shown = page.evaluate("""() => Object.fromEntries(
        [...document.querySelectorAll('#usage-spend tbody tr')].map((row) => [row.dataset.item, [
            Number(row.dataset.value), row.querySelector('.usage-value').textContent,
            row.querySelector('.usage-bar').getBoundingClientRect().width]]))""")
    for step, amount in usage["spend_by_step"].items():
        value, text, bar = shown[step]
        assert abs(value - float(amount)) < 1e-9, (step, shown, usage)
        if float(amount) > 0:
            assert text.startswith("$") and float(text[1:]) > 0 and bar > 0, (step, shown)
        else:
            assert bar == 0, (step, shown)
    assert page.inner_text("#usage-changes tr[data-item=completed] .usage-value") == str(completed)
    assert page.locator("#usage-spend caption").inner_text() == "Spend by step"  # read out as a table
    page.locator("#usage .usage-more summary").click()
    assert page.locator("#usage-stages tr", has_text="Generating the new clip").is_visible()


@pytest.fixture(autouse=True)
def _clean_script(system: PageSystem) -> Iterator[None]:
    system.predictions.clear_script()
    yield
    system.predictions.clear_script()


def _wait_compare_loaded(page: Any) -> None:
    """Both videos of the compare have a picture at the position asked for (none failed)."""
    page.wait_for_function("""() => ['compare-before', 'compare-after'].every((id) => {
        const v = document.getElementById(id); return v.readyState >= 2 && !v.seeking && !v.error; })""",
                           timeout=60_000)


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_change_a_clip_and_compare_before_after(system: PageSystem, browser: Any, shots: Path, width: str) -> None:
    watched = _open(browser, system, shots, width, "1-change")
    page = watched.page
    assert page.evaluate("window.__seen.skeletons") >= 1, "no skeletons while the clips load"
    watched.shot("loaded")
    if width == "phone":  # the narrowest phone the page supports
        page.set_viewport_size({"width": 360, "height": 740})
        watched.assert_fits()
        page.set_viewport_size(VIEWPORTS[width])
    video_before = page.get_attribute("#video", "src")
    assert "/media/" in (video_before or "")
    assert_contrast(page)
    index = CLIP[width]
    if width == "desktop":  # by keyboard: into the strip, arrows to the clip, Enter, then type
        page.locator("#clips .clip").first.focus()
        for _ in range(index):
            page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "instruction"
    else:
        _select(page, index)
    assert "clip " + str(index + 1) in page.inner_text("#chat-title").lower()
    # Before anything is sent: the estimate of a change of this clip, as the API quotes it, read once.
    estimate = assert_estimate_shown(page, system, [index])
    assert estimate["within_budget"] and page.is_enabled("#send")
    asked = len(watched.estimates)
    assert asked >= 1
    if width == "desktop":
        page.keyboard.type("make it nighttime")
        page.wait_for_timeout(500)  # longer than the page waits for a choice to settle
        assert len(watched.estimates) == asked, watched.estimates  # typing asks nothing
        page.keyboard.press("Enter")
    else:
        page.locator("#instruction").press_sequentially("make it nighttime")
        page.wait_for_timeout(500)
        assert len(watched.estimates) == asked, watched.estimates
        page.click("#send")
    page.wait_for_function("window.__seen.typing")
    watched.shot("typing")
    page.wait_for_selector("#run-progress", timeout=SLOW)
    watched.shot("progress")
    page.wait_for_function(f"document.querySelector('#video').getAttribute('src') !== {video_before!r}", timeout=SLOW)
    page.wait_for_selector("#thread .msg.success")
    seen = page.evaluate("window.__seen")
    assert len(set(seen["stages"])) >= 2, seen["stages"]
    badges = seen["badges"]
    assert "Regenerating" in badges and badges[-1] == "Completed", badges
    assert badges.index("Regenerating") < len(badges) - 1
    success = page.inner_text("#thread .msg.success")
    assert "Cost $" in success and "generation $0.20" in success, success
    assert "no LLM used" in success  # the page says honestly how the prompt was written
    assert "nighttime" in page.inner_text("#thread").lower()
    assert f"estimated {money(estimate['estimated_cost'])}" in page.inner_text("#thread .msg.user"), estimate
    assert page.locator("#thread .msg.success button", has_text="View updated video").count() == 1
    assert_usage_shown(page, system)
    watched.shot("done")

    page.locator("#thread .msg.success button", has_text="Compare before and after").last.click()
    page.wait_for_selector("#compare:not([hidden])")
    _wait_compare_loaded(page)
    means = page.evaluate("""() => ['compare-before', 'compare-after'].map((id) => {
        const v = document.getElementById(id);
        const c = document.createElement('canvas'); c.width = 64; c.height = 36;
        const g = c.getContext('2d'); g.drawImage(v, 0, 0, 64, 36);
        const d = g.getImageData(0, 0, 64, 36).data; let s = 0;
        for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
        return [s / (d.length / 4) / 3, v.currentTime]; })""")
    (before_mean, before_time), (after_mean, after_time) = means
    assert abs(before_time - after_time) < 0.05, means  # seeked together
    assert abs(before_mean - after_mean) > 20, f"the before and after frames look alike: {means}"
    watched.shot("compare")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_failed_change_shows_the_error_and_try_again_succeeds(system: PageSystem, browser: Any, shots: Path,
                                                              width: str) -> None:
    system.predictions.script(create=["content_policy"])
    watched = _open(browser, system, shots, width, "2-failure")
    page = watched.page
    _select(page, CLIP[width] + 2)
    _send(page, "make it foggy")
    page.wait_for_selector("#thread .msg.error", timeout=SLOW)
    error = page.locator("#thread .msg.error").last
    assert "did not work" in error.inner_text()
    assert error.locator("button", has_text="Try again").count() == 1
    assert error.locator("button", has_text="Cancel").count() == 1
    error.locator("summary", has_text="Details").click()
    details = error.locator("details").inner_text()
    assert "Error code" in details and "Attempts" in details and "Step" in details and "Time" in details
    assert "Traceback" not in details and "File \"" not in details
    watched.shot("error")
    assert page.get_attribute("#job-status", "class") == "badge failed"
    error.locator("button", has_text="Try again").click()
    page.wait_for_selector("#thread .msg.success", timeout=SLOW)
    assert page.text_content("#job-status") == "Completed"
    watched.shot("retried")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_reload_keeps_progress_and_cancel_keeps_the_video(system: PageSystem, browser: Any, shots: Path,
                                                          width: str) -> None:
    system.predictions.script(poll=["stall"])
    watched = _open(browser, system, shots, width, "3-cancel")
    page = watched.page
    original = _path(page.get_attribute("#video", "src"))
    _select(page, CLIP[width] + 3)
    _send(page, "add a rainbow")
    page.wait_for_function("document.getElementById('run-stage')?.textContent === 'Generating the new clip'",
                           timeout=SLOW)
    fraction = page.evaluate("document.getElementById('run-progress').value")
    watched.shot("running")
    watched.reload()
    page.wait_for_function("document.getElementById('run-stage')?.textContent === 'Generating the new clip'",
                           timeout=SLOW)
    assert page.evaluate("document.getElementById('run-progress').value") >= fraction > 0
    assert page.text_content("#job-status") == "Regenerating"
    assert page.locator("#clips .clip.regenerating").count() == 1
    watched.shot("reloaded")
    page.locator("#thread .msg.running button", has_text="Cancel").click()
    page.wait_for_selector("#thread .msg.cancelled", timeout=SLOW)
    page.wait_for_function("document.getElementById('job-status').textContent === 'Completed'")
    assert _path(page.get_attribute("#video", "src")) == original
    watched.shot("cancelled")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_a_concurrent_change_is_explained(system: PageSystem, browser: Any, shots: Path, width: str) -> None:
    system.predictions.script(poll=["stall"])
    watched = _open(browser, system, shots, width, "4-conflict", allowed_statuses=frozenset({409}),
                    hold_events=True)
    page = watched.page
    job = system.job()
    with system.client() as client:
        started = client.post(f"/api/v1/jobs/{job['id']}/clips/0/regenerate", json={"instruction": "make it rainy"})
        assert started.status_code == 202, started.text
        _select(page, CLIP[width] + 1)
        _send(page, "make it snowy")
        note = page.locator("#thread .msg.error", has_text="Another change is running")
        note.wait_for()
        assert "Nothing was spent" in note.inner_text()
        note.locator("button", has_text="Show the change to clip 1").wait_for()
        watched.shot("conflict")
        cancelled = client.post(f"/api/v1/jobs/{job['id']}/regenerations/"
                                f"{started.json()['regeneration_id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
    for route in watched.held:
        route.continue_()
    page.wait_for_function("document.getElementById('job-status').textContent === 'Completed'")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_restore_a_version_after_confirming(system: PageSystem, browser: Any, shots: Path, width: str) -> None:
    watched = _open(browser, system, shots, width, "5-restore")
    page = watched.page
    current = system.job()["current_version"]
    assert page.locator("#versions li").count() >= 2
    shown = _path(page.get_attribute("#video", "src"))
    page.locator("#versions button", has_text="Restore").first.click()
    page.wait_for_selector("#confirm[open]")
    watched.shot("confirm")
    page.locator("#confirm-ok").click()
    page.wait_for_function(f"new URL(document.querySelector('#video').src).pathname !== {shown!r}")
    restored = system.job()["current_version"]
    assert restored != current
    assert page.locator("#versions li", has_text=f"Version {restored}").locator(".badge").text_content() == "current"
    watched.shot("restored")
    page.select_option("#compare-a", "1")
    page.select_option("#compare-b", str(current))
    page.locator("#versions-compare button").click()
    page.wait_for_selector("#compare:not([hidden])")
    assert f"version {current}" in page.inner_text("#compare-caption").lower()
    _wait_compare_loaded(page)
    watched.shot("versions-compared")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_a_lost_connection_reconnects_by_itself(system: PageSystem, browser: Any, shots: Path, width: str) -> None:
    watched = _open(browser, system, shots, width, "6-reconnect", drop_first_stream=True)
    page = watched.page
    page.wait_for_function("window.__seen.connection.includes('Reconnecting…')")
    page.wait_for_function("document.getElementById('connection').textContent === 'Reconnecting…'")
    watched.shot("reconnecting")
    wait_until_true(lambda: len(watched.held) >= 2, page)  # it came back, with a fresh ticket
    watched.held[1].continue_()
    page.wait_for_function("document.getElementById('connection').hidden")
    page.emulate_media(color_scheme="dark")
    assert_contrast(page)
    watched.shot("dark")
    watched.shot("reconnected")
    watched.assert_clean()
    page.context.close()


@pytest.fixture(scope="module")
def small_budget_job(system: PageSystem, ffmpeg_exe: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-clip job whose budget cannot pay for a change (created last: the six-clip job stays the oldest)."""
    folder = tmp_path_factory.mktemp("small-job")
    clip, music = folder / "clip.mp4", folder / "music.m4a"
    for args, dest in ((["-i", "testsrc=size=320x180:rate=25:duration=1", "-c:v", "libx264", "-preset", "superfast",
                         "-pix_fmt", "yuv420p"], clip),
                       (["-i", "sine=frequency=220:sample_rate=48000:duration=1", "-c:a", "aac"], music)):
        subprocess.run([ffmpeg_exe, "-nostdin", "-y", "-hide_banner", "-loglevel", "error", "-f", "lavfi", *args,
                        str(dest)], check=True, capture_output=True, timeout=60)
    manifest = {"title": "Tiny budget", "clips": [{"prompt": "a test pattern", "duration": 1.0}],
                "budget_limit": "0.05"}
    with system.client() as client:
        created = client.post("/api/v1/jobs", data={"manifest": json.dumps(manifest)},
                              files=[("clips", ("clip.mp4", clip.read_bytes(), "video/mp4")),
                                     ("audio", ("music.m4a", music.read_bytes(), "audio/mp4"))])
        assert created.status_code == 202, created.text
        job_id: str = created.json()["id"]
        wait_for_job(client, job_id, {"completed"})
    return job_id


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_over_budget_is_explained(system: PageSystem, browser: Any, shots: Path, width: str,
                                  small_budget_job: str) -> None:
    estimate_path = f"/api/v1/jobs/{small_budget_job}/estimate"
    watched = _open(browser, system, shots, width, "7-budget", allowed_statuses=frozenset({402}),
                    job_id=small_budget_job, allowed_paths=frozenset({estimate_path}))
    page = watched.page
    assert page.is_visible("#job-select")  # two videos: the picker shows
    # The estimate passes the budget left: said before sending, and Send is off with the reason.
    estimate = assert_estimate_shown(page, system, [0], small_budget_job)
    assert not estimate["within_budget"], estimate
    cost, left = money(estimate["estimated_cost"]), money(estimate["budget_left"])
    if cost == left:  # written to the hundredth of a cent when they round alike
        cost, left = f"${float(estimate['estimated_cost']):.4f}", f"${float(estimate['budget_left']):.4f}"
    reason = f"Over the budget: this would cost about {cost} and the budget has {left} left."
    assert page.inner_text("#estimate").startswith(reason)
    assert page.is_disabled("#send") and page.get_attribute("#send", "title") == reason
    page.fill("#instruction", "make it nighttime")
    page.locator("#instruction").press("Enter")
    page.wait_for_function("(reason) => document.getElementById('run-status').textContent === reason", arg=reason)
    watched.shot("estimated")
    # When the estimate cannot be read, the gateway still refuses the change and the page says why.
    page.route(f"**{estimate_path}?*", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body='{"error": {"code": "unavailable", "message": "down", "retryable": true}}'))
    watched.reload()
    page.wait_for_function("document.getElementById('estimate').textContent.startsWith('The estimate could not')")
    assert page.is_enabled("#send")
    _send(page, "make it nighttime")
    note = page.locator("#thread .msg.error", has_text="Over the budget")
    note.wait_for()
    assert "budget" in note.inner_text() and "nothing was spent" in note.inner_text()
    watched.shot("refused")
    with system.client() as client:
        assert client.get(f"/api/v1/jobs/{small_budget_job}/regenerations").json()["regenerations"] == []
    watched.assert_clean()
    page.context.close()


# The clip strip's geometry: the strip's box and each item's and thumbnail's box inside it, and the
# layout shifts (PerformanceObserver) whose moved nodes are in the clips card, after ``since``.
STRIP_BOXES = """(since) => {
  const strip = document.getElementById('clips');
  const origin = strip.getBoundingClientRect();
  const round = (v) => Math.round(v * 10) / 10;
  const box = (node) => { const r = node.getBoundingClientRect();
    return [r.x - origin.x + strip.scrollLeft, r.y - origin.y, r.width, r.height].map(round); };
  return {strip: [origin.width, origin.height].map(round),
          items: [...strip.children].map(box), thumbs: [...strip.querySelectorAll('.thumb')].map(box),
          shift: window.__shifts.filter((e) => e.at > since).reduce((sum, e) => sum + e.value, 0)};
}"""
# Records the strip as its skeletons show it, and every layout shift that moves a node of the clips card.
SHIFTS = """
window.__shifts = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    const card = document.querySelector('.clips-card');
    if (entry.sources.some((s) => s.node && card && card.contains(s.node))) {
      window.__shifts.push({at: entry.startTime, value: entry.value});
    }
  }
}).observe({type: 'layout-shift', buffered: true});
document.addEventListener("DOMContentLoaded", () => {
  const r = document.getElementById('clips').getBoundingClientRect();
  const item = document.querySelector('#clips .clip-skeleton').getBoundingClientRect();
  const round = (v) => Math.round(v * 10) / 10;
  window.__skeleton = {strip: [r.width, r.height].map(round), item: [item.width, item.height].map(round)};
});
"""


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_thumbnails_arrive_without_moving_the_strip_and_a_missing_one_shows_its_number(
        system: PageSystem, browser: Any, shots: Path, width: str) -> None:
    job = system.job()
    broken = _path(job["clips"][3]["thumbnail_url"])  # this one answers 404
    assert broken and all(clip["thumbnail_url"] for clip in job["clips"])
    pictures = {_path(clip["thumbnail_url"]) for clip in job["clips"]}
    held: list[Any] = []
    released = False

    def answer(route: Any) -> None:
        if _path(route.request.url) == broken:
            route.fulfill(status=404, content_type="application/json",
                          body='{"error": {"code": "not_found", "message": "gone", "retryable": false}}')
        else:
            route.continue_()

    def thumbnails(route: Any) -> None:
        if released:
            answer(route)
        else:
            held.append(route)  # every thumbnail waits for the test

    def prepare(page: Any) -> None:
        page.add_init_script(SHIFTS)
        page.route(lambda url: _path(url) in pictures, thumbnails)

    watched = _open(browser, system, shots, width, "9-thumbnails", allowed_paths=frozenset({broken}), prepare=prepare)
    page = watched.page
    skeleton = page.evaluate("window.__skeleton")
    assert page.locator("#clips img").count() == 6
    assert page.evaluate("[...document.querySelectorAll('#clips img')].every((i) => !i.complete)"), "not held"
    since = page.evaluate("performance.now()")
    waiting = page.evaluate(STRIP_BOXES, since)
    watched.shot("waiting")
    # The clips replace their skeletons in the same room: as wide, as tall.
    assert waiting["strip"] == skeleton["strip"], (waiting, skeleton)
    assert waiting["items"][0][2:] == skeleton["item"], (waiting, skeleton)
    wait_until_true(lambda: len(held) >= 1, page)
    for _ in range(6):  # lazy images are asked for as they near the view; all six are in the strip's reach
        page.wait_for_timeout(100)
    released = True
    while held:
        answer(held.pop(0))
    page.wait_for_function("""() => [...document.querySelectorAll('#clips img')].every((i) => i.complete)
        && document.querySelectorAll('#clips .thumb-placeholder').length === 1""")
    loaded = page.evaluate(STRIP_BOXES, since)
    assert loaded["strip"] == waiting["strip"] and loaded["items"] == waiting["items"], (waiting, loaded)
    assert loaded["thumbs"] == waiting["thumbs"], (waiting, loaded)
    assert loaded["shift"] == 0, loaded
    assert len({tuple(thumb[2:]) for thumb in loaded["thumbs"]}) == 1  # every thumbnail one size
    # The missing thumbnail: its clip's number in the same box, the other five pictures.
    placeholder = page.locator("#clips .clip").nth(3).locator(".thumb-placeholder")
    assert placeholder.inner_text() == "4" and placeholder.is_visible()
    assert page.locator("#clips .clip").nth(3).locator("img").count() == 0
    assert page.evaluate("[...document.querySelectorAll('#clips img')].map((i) => i.naturalWidth > 0)") == [True] * 5
    watched.shot("loaded")
    watched.assert_clean()
    page.context.close()


@pytest.mark.parametrize("width", list(VIEWPORTS))
def test_one_instruction_changes_several_clips_in_one_version(system: PageSystem, browser: Any, shots: Path,
                                                              width: str) -> None:
    # Last in the file: the clips it changes then have a success in their threads.
    watched = _open(browser, system, shots, width, "8-several")
    page = watched.page
    before = system.job()
    video_before = page.get_attribute("#video", "src")
    _select(page, 4)
    page.locator("#also summary").click()
    boxes = page.locator("#also-clips input[type=checkbox]")
    assert boxes.count() == 5  # every clip but the selected one
    assert_estimate_shown(page, system, [4])
    page.locator("#also-clips label", has_text="Clip 6").locator("input").check()
    assert_estimate_shown(page, system, [4, 5])  # the choice of clips is quoted again
    watched.shot("choosing")
    _send(page, "make it rainy")
    page.wait_for_function("document.querySelectorAll('#clips .clip.regenerating').length === 2", timeout=SLOW)
    watched.shot("running")
    page.wait_for_function(f"document.querySelector('#video').getAttribute('src') !== {video_before!r}", timeout=SLOW)
    page.wait_for_selector("#thread .msg.success")
    version = before["current_version"] + 1
    # Clip 5's thread showed its own clip's stages and bar, rising, beside the whole change's bar.
    runs = page.evaluate("window.__seen.clipRuns")
    with system.client() as client:
        rows = client.get(f"/api/v1/jobs/{before['id']}/regenerations").json()["regenerations"]
    member = next(row for row in rows if row["clip_index"] == 4)  # the newest first
    own = [run for run in runs if run[0] == member["id"]]
    assert own and all(run[1].startswith("Clip 5: ") for run in own), runs
    assert "Clip 5: Generating the new clip" in {run[1] for run in own}, runs
    fractions = [run[2] for run in own]
    assert any(0 < f < 1 for f in fractions) and fractions == sorted(fractions), runs
    assert all(run[3] for run in own), runs  # the change's own bar stayed beside it
    for index in (4, 5):
        _select(page, index)
        page.wait_for_selector("#thread .msg.success")
        done = page.locator("#thread .msg.success").last.inner_text()
        assert f"clip {index + 1} is changed in version {version}" in done.lower(), done
        assert page.locator("#thread .msg.success button", has_text="View updated video").count() == 1
    job = system.job()
    assert job["current_version"] == version and len(job["versions"]) == len(before["versions"]) + 1
    assert [c["revision"] - b["revision"] for c, b in zip(job["clips"], before["clips"], strict=True)] == \
        [0, 0, 0, 0, 1, 1]
    assert all("rain" in job["clips"][i]["prompt"] for i in (4, 5))
    assert page.locator("#also-clips input:checked").count() == 0  # the choice does not stick
    assert page.locator("#versions li", has_text=f"Version {version}").locator(".version-text").inner_text() \
        .startswith(f"Version {version} · Clips 5 and 6: “make it rainy”")
    watched.shot("done")

    # The compare of the version before and the new one marks exactly the clips that changed.
    page.select_option("#compare-a", str(version - 1))
    page.select_option("#compare-b", str(version))
    page.locator("#versions-compare button").click()
    page.wait_for_selector("#compare:not([hidden])")
    page.wait_for_function("document.querySelectorAll('#compare-clips .compare-clip').length === 6")
    marked = page.eval_on_selector_all("#compare-clips .compare-clip.changed", "(bs) => bs.map((b) => b.dataset.index)")
    assert marked == ["4", "5"], marked
    assert page.locator("#compare-clips .compare-mark").count() == 2
    assert page.inner_text("#compare-changes").startswith("Changed: clips 5 and 6"), page.inner_text("#compare-changes")
    unchanged = page.locator("#compare-clips .compare-clip").nth(0).get_attribute("aria-label")
    assert unchanged == "Clip 1, unchanged", unchanged
    page.locator("#compare-clips .compare-clip.changed").last.click()  # look at clip 6 in both
    assert page.inner_text("#compare-caption").startswith(f"Clip 6: version {version - 1} (before)")
    assert float(page.get_attribute("#compare-seek", "min") or "nan") == pytest.approx(5 * CLIP_SECONDS)
    _wait_compare_loaded(page)
    watched.shot("compared")
    watched.assert_clean()
    page.context.close()
