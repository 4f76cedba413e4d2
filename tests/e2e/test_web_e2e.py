"""The web listener of a real `ohd daemon` (offline provider) on a free loopback port, asked over
real HTTP with httpx: its refusals (no token, a wrong one, another Host, another Origin, the cookie
alone for a change), the API with the token, the cookie a login sets, `/metrics` read by
prometheus_client's parser and by a real Prometheus, and the URL `ohd dashboard` prints."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ohd.core import layout
from tests.e2e.helpers import DaemonProcess, daemon_env
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

EVIL = "http://evil.example"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Web:
    daemon: DaemonProcess
    url: str
    token: str
    port: int

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/metrics", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    """One daemon for the module (each start costs seconds): a task of it completes first."""
    tmp = tmp_path_factory.mktemp("web")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    port = free_port()
    repo = make_repo(tmp / "repo")
    daemon = DaemonProcess(daemon_env(tmp, runtime, OHD_HTTP_LISTEN=f"127.0.0.1:{port}"), repo,
                           tmp / "daemon.log").start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url), timeout=30, what="the web listener")
        token = layout.web_token_path(tmp / "state").read_text().strip()
        (repo / "tasks.d" / "review.yaml").write_text("type: review\ntarget: shop/pricing.py\n")
        wait_for(lambda: daemon.json("tasks")["tasks"] and daemon.json("tasks")["tasks"][0]["status"] == "completed",
                 timeout=60, what="task 1 to complete")
        yield Web(daemon, url, token, port)
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
        shutil.rmtree(runtime, ignore_errors=True)


PAGES = ["/", "/api/status", "/api/tasks", "/api/tasks/1", "/api/models", "/api/metrics", "/api/metrics.json",
         "/no/such/page"]
CHANGES = ["/api/tasks", "/api/tasks/1/cancel", "/api/tasks/1/retry"]


def test_the_token_file_is_private_and_a_url_safe_secret(web: Web) -> None:
    path = layout.web_token_path(Path(web.daemon.env["OHD_STATE_DIR"]))
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(web.token) >= 40 and set(web.token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                         "0123456789-_")


def test_without_the_token_every_page_and_call_is_refused(web: Web) -> None:
    for path in PAGES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Cookie": "ohd_token=wrong"},
                        {"Authorization": f"Basic {web.token}"}):
            answer = web.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers, answer.text)
            assert answer.json()["kind"] == "Unauthorized" and "token" not in answer.headers.get("set-cookie", "")
    for path in CHANGES:
        answer = web.post(path, json={"type": "review", "target": "shop/pricing.py"})
        assert answer.status_code == 401, (path, answer.text)
    assert web.get("/?token=wrong", follow_redirects=False).status_code == 401
    assert len(web.daemon.json("tasks")["tasks"]) == 1        # nothing was submitted


def test_with_the_bearer_token_it_answers_the_sockets_api(web: Web) -> None:
    status = web.get("/api/status", headers=web.bearer)
    assert status.status_code == 200 and status.json()["queue"]["completed"] >= 1
    assert status.json()["repos"] == web.daemon.json("status")["repos"]
    assert web.get("/api/tasks?status=completed", headers=web.bearer).json()["tasks"][0]["id"] == 1
    assert web.get("/api/tasks/1", headers=web.bearer).json()["executions"][0]["model"] == "offline"
    submitted = web.post("/api/tasks", headers=web.bearer, json={"type": "review", "target": "shop/pricing.py",
                                                                 "priority": "low"})
    assert submitted.status_code == 201, submitted.text
    task_id = submitted.json()["id"]
    assert web.daemon.json("show", str(task_id))["source"] == "api"
    assert f"task {task_id} queued over the web listener: review shop/pricing.py" in web.daemon.log.read_text()
    # the socket's errors, statuses and JSON, as they are
    missing = web.get("/api/tasks/999999", headers=web.bearer)
    assert (missing.status_code, missing.json()["kind"]) == (404, "NotFound")
    bad = web.post("/api/tasks", headers=web.bearer, json={"type": "review", "target": "no/such.py"})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]
    assert web.post("/api/status", headers=web.bearer).status_code == 405
    assert web.post("/api/tasks", headers=web.bearer, content=b"x" * 1_000_001).status_code == 413
    wait_for(lambda: web.daemon.json("show", str(task_id))["status"] == "completed", timeout=60,
             what=f"task {task_id} to complete")


def test_a_login_url_sets_an_httponly_strict_cookie_and_drops_the_token_from_the_url(web: Web) -> None:
    with httpx.Client(base_url=web.url, timeout=30) as browser:
        login = browser.get(f"/?token={web.token}", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"].lower()
        assert cookie.startswith(f"ohd_token={web.token.lower()};")
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        page = browser.get("/")
        assert page.status_code == 200 and "/api/status" in page.text
        assert browser.get("/api/status").json()["queue"]["completed"] >= 1
        followed = browser.get(f"/api/tasks?token={web.token}&limit=1", follow_redirects=True)
        assert str(followed.url) == f"{web.url}/api/tasks?limit=1" and len(followed.json()["tasks"]) == 1


def test_another_host_name_is_refused_even_with_the_token(web: Web) -> None:
    for host in (f"evil.example:{web.port}", "evil.example", "127.0.0.1", f"127.0.0.2:{web.port}", ""):
        answer = web.get("/api/status", headers={**web.bearer, "Host": host})
        assert answer.status_code == 421 and answer.json()["kind"] == "WrongHost", (host, answer.text)
    assert web.get("/metrics", headers={"Host": "evil.example"}).status_code == 421
    for host in (f"localhost:{web.port}", f"[::1]:{web.port}", f"LOCALHOST:{web.port}"):
        assert web.get("/api/status", headers={**web.bearer, "Host": host}).status_code == 200, host


def test_a_cross_origin_post_is_refused_even_with_the_cookie_or_the_token(web: Web) -> None:
    task_id = web.post("/api/tasks", headers=web.bearer, json={"type": "review", "target": "shop/pricing.py"}).json()["id"]
    cookie = {"Cookie": f"ohd_token={web.token}"}
    for headers in (cookie, {**cookie, **web.bearer}, {**web.bearer, "Origin": "null"}):
        answer = web.post(f"/api/tasks/{task_id}/cancel", headers={**headers, "Origin": EVIL}
                          if "Origin" not in headers else headers)
        assert answer.status_code == 403 and answer.json()["kind"] == "CrossOrigin", answer.text
    # the cookie alone, with no Origin at all, is no more enough for a change
    answer = web.post(f"/api/tasks/{task_id}/cancel", headers=cookie)
    assert answer.status_code == 403 and answer.json()["kind"] == "TokenHeaderRequired"
    assert web.post("/api/tasks", headers=cookie, json={"type": "review", "target": "shop/pricing.py"}
                    ).status_code == 403
    # the same page's origin, with the token in the header, may
    same = web.post(f"/api/tasks/{task_id}/cancel", headers={**web.bearer, "Origin": web.url})
    assert same.status_code in (200, 409), same.text     # 409: it completed before the cancel came
    assert web.daemon.json("show", str(task_id))["status"] in ("cancelled", "completed", "running")


def test_answers_carry_headers_that_keep_them_out_of_frames_and_caches(web: Web) -> None:
    for answer in (web.get("/api/status", headers=web.bearer), web.get("/api/status")):
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        assert "access-control-allow-origin" not in answer.headers


def test_metrics_are_public_and_read_by_the_prometheus_client_parser(web: Web) -> None:
    answer = web.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert {"ohd_uptime_seconds", "ohd_tasks", "ohd_tasks_completed_last_hour", "ohd_throughput_tasks_per_minute",
            "ohd_model_calls", "ohd_model_tokens", "ohd_model_cost_usd", "ohd_model_success_ratio",
            "ohd_model_latency_seconds"} <= set(families)
    calls = {(s.labels["model"], s.labels["task_type"], s.labels["outcome"]): s.value
             for s in families["ohd_model_calls"].samples if s.name == "ohd_model_calls_total"}
    assert calls[("offline", "review", "accepted")] >= 1
    assert families["ohd_tasks"].type == "gauge" and families["ohd_model_latency_seconds"].type == "summary"
    # the same text the socket serves
    assert {f.name for f in text_string_to_metric_families(web.daemon.ohd("metrics").stdout)} == set(families)


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus missing (.ci/run installs Debian's prometheus package)")
def test_a_real_prometheus_scrapes_the_listener(web: Web, tmp_path: Path) -> None:
    """The scrape config the README documents, with a 1 s interval; one series read back by its HTTP API."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n"
                      "scrape_configs:\n  - job_name: ohd\n    metrics_path: /metrics\n"
                      f"    static_configs:\n      - targets: ['127.0.0.1:{web.port}']\n")
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"

        def completed() -> float | None:
            try:
                data = httpx.get(api, params={"query": 'ohd_tasks{job="ohd",status="completed"}'}, timeout=10).json()
            except (httpx.TransportError, json.JSONDecodeError):
                return None
            result = data.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result else None

        value = wait_for(completed, timeout=120, interval=0.5, what="Prometheus to scrape ohd_tasks")
        assert value >= 1
        targets = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"], targets
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=60)


def test_the_url_ohd_dashboard_prints_logs_a_browser_in(web: Web, tmp_path: Path) -> None:
    done = web.daemon.ohd("dashboard")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url == f"{web.url}/?token={web.token}"
    with httpx.Client(timeout=30) as browser:
        page = browser.get(url, follow_redirects=True)
        assert page.status_code == 200 and str(page.url) == f"{web.url}/"
        assert browser.cookies.get("ohd_token") == web.token
        assert browser.get(f"{web.url}/api/tasks/1").json()["status"] == "completed"
    # --open hands the same URL to the browser $BROWSER names
    opened = tmp_path / "opened"
    script = f"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])"
    done = subprocess.run([sys.executable, "-m", "ohd", "dashboard", "--open", "--json"], capture_output=True,
                          text=True, timeout=60, env={**web.daemon.env, "BROWSER": f'{sys.executable} -c "{script}" %s'})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"url": url} and opened.read_text() == url
