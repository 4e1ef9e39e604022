"""The playground page at `/`, in a real browser: Debian's Chromium, headless, driven by selenium
over chromedriver. A prompt is typed, the text arrives in pieces as the server streams it, and the
page reports time to first token, tok/s and the token count. A screenshot is kept in
$PICOGPT_FAST_ARTIFACTS (default: artifacts/ in the checkout)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the [serve] extra is not installed")  # CI installs it: these run there
webdriver = pytest.importorskip("selenium.webdriver", reason="the [test] extra is not installed")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

from picogpt_fast import GPT2  # noqa: E402

from .conftest import REPO  # noqa: E402
from .test_serve import NAME, Running  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("PICOGPT_FAST_ARTIFACTS", REPO / "artifacts"))


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):  # .ci/run installs Debian's chromium and chromium-driver
        pytest.fail("Chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="picogpt-fast-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _set(browser, field, value):
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)


def _wait_finished(browser, seconds=120):
    """A partial completion seen before the end (or None), once the page says it finished or failed."""
    partial, deadline = None, time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = browser.find_element(By.ID, "completion").text
        stats = browser.find_element(By.ID, "stats").text
        if text and "finished" not in stats and partial is None:
            partial = text  # a piece arrived before the rest: streamed
        if "finished" in stats or browser.find_element(By.ID, "problem").text:
            break
        time.sleep(0.01)
    return partial


def test_a_prompt_typed_in_the_page_streams_its_completion_and_the_page_follows_it(browser, model_dir):
    """Typed, started with Ctrl+Enter, streamed: the page's text is what the engine gives, the
    output box follows the stream to its last line and the stats stay in view (a screenshot of the
    end of a 400-token completion is kept); the title is the model's name."""
    model = GPT2.from_pretrained(model_dir("small", seed=7, std=0.25, n_ctx=1024))
    running = Running(model, max_batch=2, max_queue=4)
    try:
        browser.get(running.url + "/")
        assert browser.title.startswith(NAME)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Once upon a time")
        for field, value in (("max_tokens", "400"), ("temperature", "0"), ("seed", "3")):
            _set(browser, field, value)
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        partial = _wait_finished(browser)
        final = browser.find_element(By.ID, "completion").get_attribute("textContent")
        stats = browser.find_element(By.ID, "stats").text
        box = browser.execute_script(
            "const o = document.getElementById('output'); const s = document.getElementById('stats').getBoundingClientRect();"
            "return [o.scrollHeight - o.scrollTop - o.clientHeight, o.scrollHeight > o.clientHeight, s.top >= 0 && s.bottom <= window.innerHeight];"
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    finally:
        running.stop()
    (expect,), _ = model.complete(["Once upon a time"], 400)
    assert final == expect.text and final  # what the engine gives the same request
    assert partial is not None and len(partial) < len(final)  # seen growing: the page streams
    assert "time to first token" in stats and "tok/s" in stats and f"{len(expect.ids)} tokens" in stats, stats
    assert f"finished: {'length' if expect.stop_reason == 'length' else 'stop'}" in stats
    below, overflowed, stats_in_view = box
    assert overflowed and below < 30 and stats_in_view  # the last line and the stats in view
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000


def test_several_stop_strings_and_an_error_beside_the_button(browser, model_dir):
    model = GPT2.from_pretrained(model_dir("small", seed=7, std=0.25, n_ctx=1024))
    running = Running(model, max_batch=2, max_queue=4)
    try:
        browser.get(running.url + "/")
        (full,), _ = model.complete(["Once upon a time"], 60)
        stops = [full.text[20:23], full.text[12:15], "never in the text"]  # the earlier one wins
        _set(browser, "prompt", "Once upon a time")
        for field, value in (("max_tokens", "60"), ("temperature", "0")):
            _set(browser, field, value)
        stop = browser.find_element(By.ID, "stop")
        stop.clear()
        stop.send_keys("\n".join(stops))
        browser.find_element(By.ID, "go").click()
        _wait_finished(browser)
        text = browser.find_element(By.ID, "completion").get_attribute("textContent")
        stats = browser.find_element(By.ID, "stats").text
        _set(browser, "temperature", "7")  # out of range: the server's 400
        browser.find_element(By.ID, "go").click()
        _wait_finished(browser, 30)
        problem = browser.find_element(By.ID, "problem").text
    finally:
        running.stop()
    (expect,), _ = model.complete(["Once upon a time"], 60, stop=stops)
    assert text == expect.text and expect.stop_reason == "stop" and "finished: stop" in stats
    assert "temperature" in problem and "between 0 and 2" in problem
