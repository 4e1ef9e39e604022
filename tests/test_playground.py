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


def test_a_prompt_typed_in_the_page_streams_its_completion(browser, model_dir):
    model = GPT2.from_pretrained(model_dir("small", seed=7, std=0.25, n_ctx=1024))
    running = Running(model, max_batch=2, max_queue=4)
    try:
        browser.get(running.url + "/")
        assert NAME in browser.title
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Once upon a time")
        for field, value in (("max_tokens", "400"), ("temperature", "0"), ("seed", "3")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "go").click()
        partial, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline:
            text = browser.find_element(By.ID, "completion").text
            stats = browser.find_element(By.ID, "stats").text
            if text and "finished" not in stats and partial is None:
                partial = text  # a piece arrived before the rest: streamed
            if "finished" in stats:
                break
            time.sleep(0.01)
        final = browser.find_element(By.ID, "completion").get_attribute("textContent")
        stats = browser.find_element(By.ID, "stats").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    finally:
        running.stop()
    (expect,), _ = model.complete(["Once upon a time"], 400)
    assert final == expect.text and final  # what the engine gives the same request
    assert partial is not None and len(partial) < len(final)  # seen growing: the page streams
    assert "time to first token" in stats and "tok/s" in stats and f"{len(expect.ids)} tokens" in stats, stats
    assert f"finished: {'length' if expect.stop_reason == 'length' else 'stop'}" in stats
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
