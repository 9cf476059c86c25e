"""The search page in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), against
`mmembed serve` run as a user runs it: a text search whose result elements carry the API's keys, thumbnails that
load, a search by a picked audio file whose result plays, a click that searches by a result, the errors page.

Selenium never looks anything up on the network: the driver's path is given (so Selenium Manager never runs) and
its usage statistics are off. Outside CI the test skips when chromium is not installed; in CI it fails
(.ci/run installs chromium and chromium-driver).

MMEMBED_TEST_DEMO_STORE=demo-out/store runs the first two tests on the whole demo store instead of the sample subset
(`mmembed demo` makes it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from jobs.samples import SAMPLE_DIR
from jobs.serve.app import listen

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[3]
WAIT_S = 30


@pytest.fixture(scope="module")
def served(demo_store):
    """`mmembed serve ROOT --port P` in a subprocess: its base URL, once /stats answers."""
    with listen("127.0.0.1", 0) as probe:
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "serve", demo_store, "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mmembed serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "stats", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mmembed serve did not answer within 120 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which(CHROMIUM) and Path(CHROMEDRIVER).is_file()):
        message = f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ["SE_AVOID_STATS"] = "true"  # no usage statistics sent (Selenium Manager would send them)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


def _wait(driver, until, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(until, message=f"waited {WAIT_S} s for {what}")


def _results(driver) -> list[str]:
    """The keys of the result grid, once a search has rendered it (or failed: then the status line)."""
    from selenium.webdriver.common.by import By

    # read in the page, in one step: the grid's elements are replaced while it renders (a stale element otherwise)
    state = _wait(
        driver,
        lambda d: d.execute_script(
            "const s = document.getElementById('results').dataset.state; return (s === 'done' || s === 'error') && s;"
        ),
        "the results",
    )
    assert state == "done", driver.find_element(By.ID, "status").text
    return [e.get_attribute("data-key") for e in driver.find_elements(By.CSS_SELECTOR, "#results article.hit")]


def _open(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#modality option")) > 1, "the pickers")


def test_a_typed_query_shows_the_apis_results_with_thumbnails(browser, served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    _open(browser, served)
    # modality "auto": typed words search the pictures
    browser.find_element(By.ID, "q").send_keys("a red circle", Keys.ENTER)
    images = sum(p["rows"] for p in httpx.get(served + "stats").json()["embeddings"] if p["modality"] == "image")
    assert len(_results(browser)) == min(12, images)  # the page asks for 12
    assert "from image / shapes-clip" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "q").clear()

    Select(browser.find_element(By.ID, "modality")).select_by_value("image")
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == ["auto", "shapes-clip"]
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    browser.find_element(By.ID, "q").send_keys("a red circle", Keys.ENTER)
    keys = _results(browser)

    answer = httpx.post(served + "search", json={"text": "a red circle", "modality": "image", "k": 5}).json()
    assert keys == [h["key"] for h in answer["results"]]
    assert all(h["id"].startswith("shapes/red_circle_") for h in answer["results"]), answer
    loaded = _wait(
        browser,
        lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#results img.thumb')];"
            "return imgs.length && imgs.every((i) => i.complete) && imgs.map((i) => i.naturalWidth);"
        ),
        "the thumbnails",
    )
    assert len(loaded) == 5 and all(w > 0 for w in loaded), loaded
    assert "5 results from image / shapes-clip" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "search-page.png"))
    assert (tmp_path / "search-page.png").stat().st_size > 10_000

    # clicking a result searches by it: the item itself comes first
    first = browser.find_element(By.CSS_SELECTOR, "#results article.hit")
    first.find_element(By.CSS_SELECTOR, "button.like").click()
    _wait(
        browser,
        lambda d: (
            "items like"
            in d.execute_script("const h = document.querySelector('#results h2'); return h ? h.textContent : '';")
        ),
        "the item search",
    )
    assert _results(browser)[0] == keys[0]


def test_a_picked_audio_file_finds_clips_that_play(browser, served, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, served)
    clip = SAMPLE_DIR / "speech" / "rocket_us.flac"
    browser.find_element(By.ID, "file").send_keys(str(clip))
    keys = _results(browser)
    with clip.open("rb") as f:
        answer = httpx.post(served + "search", files={"file": (clip.name, f)}, data={"k": "12"}).json()
    assert keys == [h["key"] for h in answer["results"]] and answer["model"] == "whisper-tiny.en"
    played = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const audio = document.querySelector('#results article.audio audio');
        audio.play().then(() => setTimeout(() => done({paused: audio.paused, time: audio.currentTime}), 700),
                          (err) => done({error: String(err)}));"""
    )
    assert "error" not in played and (not played["paused"] or played["time"] > 0), played
    browser.save_screenshot(str(tmp_path / "audio-results.png"))


def test_the_errors_page_lists_the_errors_table(browser, served):
    from selenium.webdriver.common.by import By

    browser.get(served + "errors")
    _wait(browser, lambda d: "inputs failed" in d.find_element(By.ID, "status").text, "the errors")
    rows = browser.find_elements(By.CSS_SELECTOR, "#errors tbody tr")
    assert len(rows) == 1 and "photos/broken.png" in rows[0].text
