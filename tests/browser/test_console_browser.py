"""The console in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against `python -m workers console` serving a test database. It checks what
a person sees on the overview and on a waiting purchase's trace, and acts once (sign in,
retry). Screenshots go to the test's folder, and to KC_SCREENSHOT_DIR when it is set
(`make screenshots` writes docs/console-overview.png and docs/console-trace.png).

Without chromium the test is skipped, except in CI (CI=true), where .ci/run installs it and
a missing browser is a failure."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import DictRow
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.console_world import World, build_world
from tests.helpers import one, wait_for
from workers.settings import REPO_ROOT

Conn = psycopg.Connection[DictRow]
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def need_a_browser() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    missing = "chromium" if not CHROMIUM else "chromedriver (Debian: chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{missing} is not installed; .ci/run installs it in CI")
    pytest.skip(f"{missing} is not installed (apt-get install chromium chromium-driver)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def served(
    request: pytest.FixtureRequest, conn: Conn, db_url: str, tmp_path: Path
) -> Iterator[tuple[str, World]]:
    """`python -m workers console` on a free port, on the console's world (its operators);
    on loopback, or on the address a test gives (indirect parametrization)."""
    need_a_browser()
    host = getattr(request, "param", "127.0.0.1")
    world = build_world(conn, db_url)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "KC_CONSOLE_TOKEN"},
        "DATABASE_URL": db_url,
    }
    log = tmp_path / "console.log"
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "console", "--host", host, "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=sink,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is None and answers(base + "/"), 30, "the console")
        yield base, world
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn stops cleanly, then ends by the signal it was sent.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log.read_text(), log.read_text()[-3000:]


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    need_a_browser()
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1250",
        "--lang=en-GB",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def follow(driver: WebDriver, element: WebElement) -> None:
    """Click a link or a button and wait for the next page, as a person would: nothing is
    read from the page being left."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 15).until(expected_conditions.staleness_of(page))


def screenshot(driver: WebDriver, name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("KC_SCREENSHOT_DIR")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO_ROOT / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / name)


def test_a_person_reads_the_overview_and_a_waiting_purchase_s_trace(
    served: tuple[str, World], browser: WebDriver, conn: Conn, tmp_path: Path
) -> None:
    base, world = served
    browser.get(base + "/")
    assert browser.title == "Overview · Koding Caravan operations"
    funnel = {
        key: browser.find_element(By.ID, f"funnel-{key}").text
        for key in (
            "payments",
            "purchases",
            "upgrades",
            "rejected",
            "failed",
            "in-purchase",
            "approved",
            "pending",
            "closed",
            "in-allocation",
            "sessions",
        )
    }
    # Four payments: two purchases, one rejected, one whose purchase job failed; of the two
    # purchases one approved, one waiting. Each row adds up to its whole.
    assert funnel == {
        "payments": "4",
        "purchases": "2",
        "upgrades": "0",
        "rejected": "1",
        "failed": "1",
        "in-purchase": "0",
        "approved": "1",
        "pending": "1",
        "closed": "0",
        "in-allocation": "0",
        "sessions": "10",
    }
    stages = [
        row.find_element(By.TAG_NAME, "td").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
    ]
    assert stages == ["purchase", "allocation", "sessions"]
    chart = browser.find_element(By.CSS_SELECTOR, "svg.chart")
    assert chart.is_displayed() and chart.size["width"] > 600
    screenshot(browser, "console-overview.png", tmp_path)

    # From the navigation to the waiting purchases, then to Meera's trace.
    follow(browser, browser.find_element(By.PARTIAL_LINK_TEXT, "Waiting"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Waiting for a trainer"
    follow(browser, browser.find_element(By.LINK_TEXT, "Meera Iyer"))
    summary = browser.find_element(By.CSS_SELECTOR, ".summary").text
    assert summary.startswith("Waiting: Waiting for a trainer (no_free_slot): 1 trainer(s)")
    when = [
        row.find_element(By.CSS_SELECTOR, "td.at").text
        for row in browser.find_elements(By.CSS_SELECTOR, ".timeline tbody tr")
    ]
    assert len(when) == 4 and all(w.endswith(" IST") for w in when)  # Asia/Kolkata

    # Signing in (Priya's own token names her) brings her back to the trace, with what she
    # may do.
    follow(browser, browser.find_element(By.LINK_TEXT, "Sign in"))
    browser.find_element(By.NAME, "token").send_keys(world.token("Priya"))
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.action button"))
    assert browser.find_element(By.CSS_SELECTOR, ".flash").text == "Signed in as Priya."
    assert "Meera Iyer" in browser.find_element(By.TAG_NAME, "h2").text
    screenshot(browser, "console-trace.png", tmp_path)

    follow(browser, browser.find_element(By.XPATH, "//button[text()='Retry the allocation now']"))
    assert browser.find_element(By.CSS_SELECTOR, ".flash").text.startswith(
        f"allocation {world.waiting_purchase} enqueued again as job"
    )
    last = browser.find_elements(By.CSS_SELECTOR, ".timeline tbody tr")[-1].text
    assert "replayed" in last and last.endswith("console:Priya")
    assert one(conn, "SELECT actor FROM stage_history WHERE event = 'replayed'") == {
        "actor": "console:Priya"
    }


@pytest.mark.parametrize("served", ["0.0.0.0"], indirect=True)
def test_beyond_loopback_a_person_signs_in_before_any_page(
    served: tuple[str, World], browser: WebDriver
) -> None:
    base, world = served
    browser.get(f"{base}/trace/{world.waiting}")
    assert browser.title == "Sign in · Koding Caravan operations"
    assert "Meera" not in browser.find_element(By.TAG_NAME, "body").text
    browser.find_element(By.NAME, "token").send_keys(world.token("Arun"))
    follow(browser, browser.find_element(By.CSS_SELECTOR, "form.action button"))
    assert browser.find_element(By.CSS_SELECTOR, ".flash").text == "Signed in as Arun."
    assert "Meera Iyer" in browser.find_element(By.TAG_NAME, "h2").text
    follow(browser, browser.find_element(By.XPATH, "//button[text()='Sign out']"))
    browser.get(f"{base}/waiting")
    assert browser.title == "Sign in · Koding Caravan operations"
