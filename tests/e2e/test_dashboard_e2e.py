"""The dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium, against a real `ohd daemon` with `http_listen` on a free port, one worker and
the fake OpenRouter answering after 4 s (slow enough to watch a task queue, run and complete).

Skipped only where chromedriver is missing (.ci/run installs it as root). With
OHD_DASHBOARD_SCREENSHOTS=DIR the overview and a task page are saved there (the README's images:
`OHD_DASHBOARD_SCREENSHOTS=docs pytest tests/e2e/test_dashboard_e2e.py`); else into the test's tmp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
from tests.e2e.test_web_e2e import answers, free_port
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

from ohd.core import layout

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMEDRIVER is None or CHROMIUM is None,
                                reason="chromedriver missing (.ci/run installs Debian's chromium and chromium-driver)")

if CHROMEDRIVER is not None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import Select

MODEL = "fake/slow:free"
# a hang bound for what a real task does (two pytest runs and coverage): a fresh-clone CI run at
# load 15 took over 60 s for one task to complete
SETTLE_S = 300.0


@dataclass
class Site:
    daemon: DaemonProcess
    url: str
    token: str
    shots: Path

    def submit(self) -> int:
        answer = httpx.post(self.url + "/api/tasks", timeout=30, headers={"Authorization": f"Bearer {self.token}"},
                            json={"type": "unit_test", "target": "shop/pricing.py"})
        assert answer.status_code == 201, answer.text
        return int(answer.json()["id"])

    def task(self, task_id: int) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/tasks/{task_id}", timeout=30,
                         headers={"Authorization": f"Bearer {self.token}"}).json()  # type: ignore[no-any-return]

    def a_completed_task(self) -> int:
        """A task that completed: one the other tests ran, or (xdist ran them on another worker, with
        its own daemon) one run now."""
        done = [t["id"] for t in self.daemon.json("tasks")["tasks"] if t["status"] == "completed"]
        if done:
            return int(done[0])
        task_id = self.submit()
        wait_for(lambda: self.task(task_id)["status"] in ("completed", "failed"), timeout=SETTLE_S,
                 what=f"task {task_id} to finish")
        assert self.task(task_id)["status"] == "completed", self.task(task_id)
        return task_id

    def idle(self) -> bool:
        return all(t["status"] in ("completed", "failed", "cancelled")
                   for t in self.daemon.json("tasks")["tasks"])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dash")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    port = free_port()
    repo = make_repo(tmp / "repo")
    shots = Path(os.environ.get("OHD_DASHBOARD_SCREENSHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with fake_openrouter("--latency-ms", "4000") as base:
        env = daemon_env(tmp, runtime, OPENROUTER_API_KEY="k", OHD_BASE_URL=base, OHD_MODELS=MODEL,
                         OHD_WORKERS="1", OHD_HTTP_LISTEN=f"127.0.0.1:{port}")
        daemon = DaemonProcess(env, repo, tmp / "daemon.log").start()
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: answers(url), timeout=30, what="the web listener")
            yield Site(daemon, url, layout.web_token_path(tmp / "state").read_text().strip(), shots)
        finally:
            assert daemon.stop() == 0, daemon.log.read_text()
            shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: WebDriver, css: str) -> str:
    """The element's text, read in one script (the live updates replace rows between two calls)."""
    return str(driver.execute_script("var e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                                     css))


def running_ids(driver: WebDriver) -> list[str]:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll('#running tbody a')).map(a => a.textContent);"))


def running_cells(driver: WebDriver) -> list[str]:
    return list(driver.execute_script(
        "var row = document.querySelector('#running tbody tr');"
        "return row ? Array.from(row.cells).map(c => c.textContent) : [];"))


def model_calls(driver: WebDriver) -> int:
    """The calls column of MODEL's row in the overview's model table."""
    cells = driver.execute_script(
        "var row = Array.from(document.querySelectorAll('#models tbody tr'))"
        ".find(r => r.cells[0].textContent === arguments[0]);"
        "return row ? Array.from(row.cells).map(c => c.textContent) : [];", MODEL)
    return int(cells[5]) if cells else -1


def charted(driver: WebDriver) -> tuple[int, int]:
    """(tasks completed in the throughput chart's hours, MODEL's accepted calls in the per-model chart)."""
    done, accepted = driver.execute_script(
        "var hours = Array.from(document.querySelectorAll('#throughput-chart g.hour'));"
        "var model = Array.from(document.querySelectorAll('#models-chart g.model'))"
        ".find(g => g.getAttribute('data-model') === arguments[0]);"
        "return [hours.reduce((n, g) => n + Number(g.getAttribute('data-completed')), 0),"
        "        model ? Number(model.getAttribute('data-accepted')) : 0];", MODEL)
    return int(done), int(accepted)


def login(site: Site, browser: WebDriver) -> None:
    """The token's URL once: the cookie for the pages (each test its own: xdist may run them apart,
    and the refusal test deletes the cookies)."""
    browser.get(f"{site.url}/?token={site.token}")
    assert browser.current_url == site.url + "/"


def test_without_the_token_every_page_is_refused(site: Site, browser: WebDriver) -> None:
    browser.get(site.url + "/metrics")          # on the listener's origin, to clear its cookies
    browser.delete_all_cookies()
    for path in ("/", "/tasks", "/tasks?status=completed", "/tasks/1", "/static/dashboard.js", "/api/status"):
        browser.get(site.url + path)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert '"kind":"Unauthorized"' in body.replace(" ", ""), (path, body)
        assert site.token not in browser.page_source
    browser.get(site.url + "/?token=wrong")
    assert "Unauthorized" in browser.find_element(By.TAG_NAME, "body").text


@pytest.mark.timeout(900)
def test_the_overview_shows_a_task_go_queued_running_completed_without_a_reload(site: Site,
                                                                              browser: WebDriver) -> None:
    browser.get(f"{site.url}/?token={site.token}")
    assert browser.current_url == site.url + "/"            # the login dropped the token from the URL
    assert "Overview" in text(browser, "h1") and MODEL in text(browser, "#models")
    browser.execute_script("window.ohdNotReloaded = true;")  # gone if the page were loaded again
    wait_for(lambda: "live" in text(browser, "#live") and "stopped" not in text(browser, "#live"),
             what="the first live update")
    completed, last_hour = int(text(browser, '[data-queue="completed"]')), int(text(browser, "#last-hour"))
    calls, (charted_done, charted_accepted) = model_calls(browser), charted(browser)
    assert calls >= 0 and len(browser.find_elements(By.CSS_SELECTOR, "#throughput-chart g.hour")) == 24
    first, second = site.submit(), site.submit()             # one worker: the second waits for the first
    wait_for(lambda: text(browser, '[data-queue="queued"]') == "1" and f"#{first}" in running_ids(browser),
             timeout=30, what=f"task {second} queued behind task {first} on the page")
    browser.save_screenshot(str(site.shots / "dashboard-overview.png"))
    wait_for(lambda: f"#{second}" in running_ids(browser), timeout=SETTLE_S, what=f"task {second} running on the page")
    cells = running_cells(browser)
    assert cells[0] == f"#{second}" and cells[3].endswith("s"), cells          # its elapsed time
    wait_for(lambda: text(browser, '[data-queue="completed"]') == str(completed + 2) and not running_ids(browser),
             timeout=SETTLE_S, what=f"task {second} completed on the page")
    # the model table and both charts follow without a reload: two more tasks completed, and the
    # model's accepted calls (one or two: the second task's same request may be answered by a
    # replay, which is no call)
    wait_for(lambda: model_calls(browser) > calls and charted(browser)[0] == charted_done + 2
             and charted(browser)[1] > charted_accepted and text(browser, "#last-hour") == str(last_hour + 2),
             timeout=60, what="the model table, the charts and the last hour's count to show the two tasks")
    assert browser.execute_script("return window.ohdNotReloaded === true;")
    assert site.task(second)["status"] == "completed"
    assert text(browser, '[data-queue="queued"]') == "0"
    browser.execute_script("document.getElementById('charts').scrollIntoView();")
    browser.save_screenshot(str(site.shots / "dashboard-charts.png"))


@pytest.mark.timeout(900)
def test_the_task_list_filters_and_opens_a_task(site: Site, browser: WebDriver) -> None:
    wait_for(site.idle, timeout=SETTLE_S, what="no task in flight")
    site.a_completed_task()
    cancelled = site.submit()
    assert site.daemon.ohd("cancel", str(cancelled)).returncode == 0
    login(site, browser)
    browser.get(site.url + "/tasks")
    assert f"#{cancelled}" in text(browser, "#tasks")
    Select(browser.find_element(By.ID, "filter-status")).select_by_value("completed")
    Select(browser.find_element(By.ID, "filter-model")).select_by_value(MODEL)
    browser.find_element(By.ID, "apply").click()
    wait_for(lambda: "status=completed" in browser.current_url, what="the filtered list")
    statuses = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#tasks tbody td:nth-child(2)")]
    assert statuses and set(statuses) == {"completed"}, statuses
    assert f"#{cancelled}" not in text(browser, "#tasks")
    Select(browser.find_element(By.ID, "filter-type")).select_by_value("review")     # none of that type
    browser.find_element(By.ID, "apply").click()
    wait_for(lambda: "type=review" in browser.current_url, what="the list filtered by type")
    assert "no task matches" in text(browser, "#tasks")
    browser.back()
    link = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody a")[0]
    task_id = link.text.lstrip("#")
    link.click()
    wait_for(lambda: browser.current_url == f"{site.url}/tasks/{task_id}", what="the task page")
    assert text(browser, "#task-status") == "completed"
    assert MODEL in text(browser, "#executions") and "accepted" in text(browser, "#validation")
    browser.find_element(By.CSS_SELECTOR, "#calls details summary").click()
    assert "shop/pricing.py" in text(browser, "#calls")            # the prompt as the model got it
    assert text(browser, "#output")                                 # the test file it wrote
    browser.execute_script("window.scrollTo(0, 0);")
    browser.save_screenshot(str(site.shots / "dashboard-task.png"))


@pytest.mark.timeout(900)
def test_cancel_a_held_task_and_retry_it_with_the_buttons(site: Site, browser: WebDriver) -> None:
    wait_for(site.idle, timeout=SETTLE_S, what="no task in flight")
    busy, held = site.submit(), site.submit()            # `held` waits in the queue behind `busy`
    login(site, browser)
    browser.get(f"{site.url}/tasks/{held}")
    browser.execute_script("window.ohdNotReloaded = true;")  # gone if the page were loaded again
    assert text(browser, "#task-status") == "queued"
    assert text(browser, "#action-note") == ""           # the script enabled the buttons
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: text(browser, "#task-status") == "cancelled", timeout=30, what="the page to say cancelled")
    assert site.task(held)["status"] == "cancelled" and site.task(busy)["status"] in ("running", "completed")
    browser.find_element(By.ID, "retry").click()
    wait_for(lambda: text(browser, "#task-status") in ("queued", "running", "completed"), timeout=30,
             what="the page to say queued again")
    done = wait_for(lambda: site.task(held)["status"] in ("completed", "failed") and site.task(held),
                    timeout=SETTLE_S, what=f"task {held} retried to the end")
    assert done["status"] == "completed"
    # the page followed it to the end by itself: its status, its executions and its output
    wait_for(lambda: text(browser, "#task-status") == "completed" and MODEL in text(browser, "#executions")
             and "accepted" in text(browser, "#validation") and bool(text(browser, "#output")),
             timeout=60, what=f"task {held}'s page to show it completed")
    assert browser.execute_script("return window.ohdNotReloaded === true;")
    # a second cancel of a finished task is refused, and the page says why
    browser.get(f"{site.url}/tasks/{held}")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: "cancel refused" in text(browser, "#action-note"), what="the refusal on the page")


def test_with_javascript_off_the_pages_read_and_the_buttons_are_disabled(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as plain:     # no script runs here
        plain.get(f"/?token={site.token}", follow_redirects=True)
        overview = plain.get("/")
        assert overview.status_code == 200 and 'data-queue="completed"' in overview.text and MODEL in overview.text
        assert overview.headers["content-security-policy"].startswith("default-src 'self'")
        assert "<script>" not in overview.text and "style=" not in overview.text
        page = plain.get("/tasks/1").text
        assert 'id=cancel data-task="1" data-action=cancel disabled' in page and "need JavaScript" in page
        assert plain.get("/static/dashboard.js").headers["content-type"].startswith(("text/javascript",
                                                                                      "application/javascript"))
        missing = plain.get("/tasks/999999")
        assert missing.status_code == 404 and "999999" in missing.text
        assert plain.get("/tasks?status=nonsense").status_code == 400
