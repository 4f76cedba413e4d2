"""Secrets (issue 11, point 6): after a full run with errors the API key is nowhere ohd writes or
answers, and it goes to no host but the configured `base_url`'s.

One real daemon process gets a recognisable key (`sk-or-v1-` + 64 random hex digits) through its
configured variable (`api_key_env`, not the default one). The fake OpenRouter (in this process,
a real HTTP server on 127.0.0.1) echoes what it is sent: the `Authorization` header, the token,
the token with its prefix cut and URL-encoded, in error bodies (JSON and not), in a response
header, in a 200 error body, in an answer's code and `model` field, in a message long enough that
a cut at the message limit falls through the key, in the model list, and in a redirect to a
second listener under another host name (`localhost`, another port). Six tasks of three types
fail or are accepted. Then every log line, every row of every table (read through sqlite3, so
the WAL too) and the raw bytes of every state file, every file in the repo (reports, outputs,
the task files' folders), the call history, `ohd status/tasks/show/models/metrics` (JSON and
text) and every request the servers received are searched for the key and pieces of it.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.helpers import ROOT, DaemonProcess, daemon_env
from tests.support.fake_openrouter import (
    AUTH,
    DEFAULT_MODELS,
    KEY,
    KEY_TAIL,
    KEY_URL,
    Answer,
    FakeOpenRouter,
    echo_key,
    error,
    error_in_200_body,
    garbage,
    ok,
    redirect,
)
from tests.support.gitrepo import make_repo
from tests.support.waiting import wait_for

pytestmark = pytest.mark.reliability

SECRET = "sk-or-v1-" + secrets.token_hex(32)
HEX = SECRET.removeprefix("sk-or-v1-")
# A leak in any form holds one of these: the whole key, the key without its prefix (URL-encoded
# and JSON-escaped it is the same text), and its halves (what a cut through the key leaves).
PIECES = (SECRET, HEX, HEX[:24], HEX[-24:], HEX.upper()[:24])
KEY_ENV = "SECRETS_TEST_MODEL_KEY"

TESTS = """```python
from shop.pricing import total


def test_total_applies_the_discount() -> None:
    assert total([100.0], discount=0.25) == 75.0
```
"""
LEAKY_TESTS = f"""```python
import urllib.request

from shop.pricing import total

API_KEY = "{KEY}"


def test_total() -> None:
    assert total([1.0]) == 1.0
```
"""
PRYING_TESTS = f"""```python
import os

from shop.pricing import total


def test_total() -> None:
    environ = open(f"/proc/{{os.getppid()}}/environ", "rb").read().decode()   # the daemon's own
    assert total([1.0]) == 2.0, [v for v in environ.split("\\0") if v.startswith("{KEY_ENV}=")]
```
"""
REVIEW = ("The function `total` rounds the discounted sum to two decimals and refuses a discount outside "
          "[0, 1); `Cart.add` refuses negative prices. Both are small and correct; `is_free` compares a float "
          "with zero, which is fine for prices that were never computed.\n")
NOTE = "```text\nA short note about the pricing module: total, is_free and Cart.\n```\n"

TASKS = {   # file name -> (task file, the status it must end in)
    "1-auth.yaml": ("type: unit_test\ntarget: shop/pricing.py\nmodels: [echo/auth]\n", "failed"),
    "2-raw.yaml": ("type: review\ntarget: shop/pricing.py\nmodels: [echo/raw]\n", "failed"),
    "3-redirect.yaml": ("type: custom\ntarget: shop/pricing.py\noutput: notes/redirect.txt\nprompt: Say hi\n"
                        "models: [echo/redirect]\n", "failed"),
    "4-review.yaml": ("type: review\ntarget: shop/pricing.py\nmodels: [echo/gone, echo/limited, echo/served]\n",
                      "completed"),
    "5-tests.yaml": ("type: unit_test\ntarget: shop/pricing.py\nmodels: [echo/content]\n", "completed"),
    "6-note.yaml": ("type: custom\ntarget: shop/pricing.py\noutput: notes/pricing.txt\nprompt: Describe it\n"
                    "models: [echo/long, echo/in-200]\n", "completed"),
    "7-prying.yaml": ("type: unit_test\ntarget: shop/pricing.py\noutput: tests/test_pricing_env.py\n"
                      "models: [echo/prying]\n", "completed"),
}


def _served_by_the_key() -> Answer:
    """A good review whose `model` field (recorded as who answered) is the key."""
    body = dict(ok(REVIEW).json)
    body["model"] = KEY
    return Answer(json=body)


def _scripts(other: str) -> dict[str, list[Answer]]:
    return {
        "echo/auth": [echo_key(401)],
        "echo/raw": [garbage(f"<html>bad request: Authorization was {AUTH}; key {KEY_TAIL}</html>".encode(), 400)],
        "echo/redirect": [redirect(f"{other}/chat/completions?key={KEY_URL}")],
        "echo/gone": [echo_key(404, f"No endpoints found for {KEY}")],
        "echo/limited": [error(429, f"Rate limit exceeded for {AUTH}", headers=(("Retry-After", "30"),
                                                                                 ("X-Echo", KEY)))],
        "echo/served": [_served_by_the_key(), ok(REVIEW)],
        "echo/content": [ok(LEAKY_TESTS), ok(TESTS)],
        # the message limit (400 characters) falls 32 digits into the key: cut first, they would remain
        "echo/long": [echo_key(404, "x" * 348 + " " + KEY)],
        "echo/in-200": [error_in_200_body(f"provider failed for {AUTH}"), ok(NOTE)],
        # a test that tries to print the key from the daemon's environment (the screen and the sandbox stop it)
        "echo/prying": [ok(PRYING_TESTS), ok(TESTS)],
    }


@dataclass
class Run:
    """What a full run left: texts by where they were found, and the requests both servers saw."""

    places: dict[str, bytes]
    statuses: dict[str, str]
    errors: dict[str, str]
    server: FakeOpenRouter
    other: FakeOpenRouter
    repo: Path


def _cli_batch(env: dict[str, str], commands: list[list[str]]) -> list[str]:
    """Each `ohd` command's stdout, run in one interpreter (one start-up instead of one per command)."""
    script = ("import contextlib, io, json, sys\nfrom ohd.cli.commands import main\nout = []\n"
              "for argv in json.loads(sys.argv[1]):\n    buf = io.StringIO()\n"
              "    with contextlib.redirect_stdout(buf):\n        code = main(argv)\n"
              "    assert code == 0, (argv, code)\n    out.append(buf.getvalue())\n"
              "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def _finished(db: Path) -> dict[str, str] | None:
    """source file -> status once every task is completed or failed (read through sqlite3)."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT source, status FROM task").fetchall()
    except sqlite3.OperationalError:    # not migrated yet
        return None
    done = {str(source).rsplit("/", 1)[-1]: str(status) for source, status in rows}
    return done if len(done) == len(TASKS) and set(done.values()) <= {"completed", "failed"} else None


def _store_rows(db: Path) -> bytes:
    """Every row of every table as SQL text; read through sqlite3, so what is still in the WAL too."""
    with sqlite3.connect(db, timeout=10) as conn:
        return "\n".join(conn.iterdump()).encode()


def _files(root: Path) -> dict[str, bytes]:
    return {f"file {path}": path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("secrets")
    runtime = Path(tempfile.mkdtemp(prefix="ohd-rt-"))
    repo = make_repo(tmp / "repo")
    with FakeOpenRouter() as other, FakeOpenRouter(models=[*DEFAULT_MODELS, f"echo/listed-{KEY}",
                                                           f"echo/about-{KEY_TAIL}"]) as server:
        for model, answers in _scripts(f"http://localhost:{other.port}/api/v1").items():
            server.script(model, answers)
        server.default = error(500, "unscripted request")    # a test that asks more than planned sees it
        (tmp / "config.toml").write_text(f'api_key_env = "{KEY_ENV}"\n')
        env = daemon_env(tmp, runtime, **{KEY_ENV: SECRET}, OHD_BASE_URL=server.url, OHD_MODELS="auto",
                         OHD_LOG_LEVEL="DEBUG", OHD_LOG_FORMAT="json", OHD_LOG_FILE=str(tmp / "ohd.log"),
                         OHD_TEST_RUNS="1")
        daemon = DaemonProcess(env, repo, tmp / "daemon.log").start()
        try:
            for name, (text, _) in TASKS.items():
                (repo / "tasks.d" / name).write_text(text)
            statuses = wait_for(lambda: _finished(tmp / "state" / "ohd.db"), timeout=120, what="every task to end")
            ids = [str(n) for n in range(1, len(TASKS) + 1)]
            replies = _cli_batch(env, [["status", "--json"], ["status"], ["tasks", "--json"], ["tasks"],
                                       ["models", "--json"], ["models"], ["metrics"], ["metrics", "--json"],
                                       *[["show", n, "--json"] for n in ids], *[["show", n] for n in ids],
                                       *[["show", n, "--calls", "--json"] for n in ids]])
        finally:
            assert daemon.stop() == 0
        places: dict[str, bytes] = {f"reply {n}": reply.encode() for n, reply in enumerate(replies)}
        places.update(_files(tmp / "state"))    # the raw files first: opening the store may checkpoint the WAL
        places["store rows"] = _store_rows(tmp / "state" / "ohd.db")
        places.update(_files(repo))
        places["daemon stderr"] = (tmp / "daemon.log").read_bytes()
        places["log file"] = (tmp / "ohd.log").read_bytes()
        shown = [json.loads(reply) for reply in replies[8:8 + len(ids)]]
        yield Run(places, statuses, {t["source"].rsplit("/", 1)[-1]: t["error"] or "" for t in shown},
                  server, other, repo)
    for child in sorted(runtime.glob("**/*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    runtime.rmdir()


def _leaks(places: dict[str, bytes]) -> list[str]:
    """Where a piece of the key is, each place once (the lines around the first piece found)."""
    found = []
    for where, data in places.items():
        if piece := next((p.encode() for p in PIECES if p.encode() in data), None):
            at = data.index(piece)
            found.append(f"{where}: ...{data[max(0, at - 60):at + 12].decode('utf-8', 'replace')}...")
    return found


def test_the_run_met_every_echo_and_ended_each_task_as_planned(run: Run) -> None:
    assert run.statuses == {name: status for name, (_, status) in TASKS.items()}
    assert all(run.server.remaining(model) == 0 for model in _scripts("x")), "an echo was never sent"
    assert "auth: HTTP 401: invalid credentials: Bearer ***" in run.errors["1-auth.yaml"]
    assert "bad_request: HTTP 400:" in run.errors["2-raw.yaml"] and "***" in run.errors["2-raw.yaml"]
    assert "ohd follows no redirect" in run.errors["3-redirect.yaml"]
    assert (run.repo / "tests" / "test_pricing.py").read_text().count("def test_") == 1
    assert not (run.repo / "notes" / "redirect.txt").exists()
    assert "total" in (run.repo / "shop" / ".ohd" / "reviews" / "pricing.py.md").read_text()
    # the refused answers were asked for again with a reason that names no key
    leaky = run.server.requests_for("echo/content")
    assert len(leaky) == 2 and "repeats the API key" in json.dumps(leaky[1].body)
    # the prying test failed and its pytest output was fed back (masked: `SECRETS_TEST_MODEL_KEY=***`
    # while the test process can read the daemon's environment)
    prying = run.server.requests_for("echo/prying")
    assert len(prying) == 2 and "test_pricing_env.py" in json.dumps(prying[1].body)
    assert (run.repo / "tests" / "test_pricing_env.py").is_file()


def test_the_key_is_in_no_log_line_store_row_file_or_reply(run: Run) -> None:
    assert {"store rows", "daemon stderr", "log file"} <= run.places.keys()
    assert any(where.endswith("/ohd.db") for where in run.places) and b"CREATE TABLE" in run.places["store rows"]
    assert b'"outcome": "auth"' in run.places["log file"]     # the log is the DEBUG one, with the calls
    leaks = _leaks(run.places)
    assert not leaks, "the key leaked into:\n" + "\n".join(leaks)


def test_the_key_went_only_to_the_base_url_and_only_in_the_header(run: Run) -> None:
    assert run.other.requests == [], "a redirect to another host was followed"
    seen = run.server.requests
    assert {r.path.split("?")[0] for r in seen} >= {"/api/v1/models", "/api/v1/chat/completions"}
    assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in seen)
    for request in seen:     # never in a URL, a body (the prompt) or another header
        rest = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert not _leaks({request.path: (request.path + json.dumps(request.body) + json.dumps(rest)).encode()})


def test_the_redactor_masks_every_form_and_ignores_placeholder_keys() -> None:
    from ohd.logfmt import Redactor, forms

    key = "sk-or-v1-" + "ab/cd+ef" * 3 + secrets.token_hex(8)
    redactor = Redactor([key])
    tail = key.removeprefix("sk-or-v1-")
    for form in (key, f"Bearer {key}", tail, urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key),
                 json.dumps(key)[1:-1], urllib.parse.quote(tail, safe="")):
        masked = redactor.redact(f"before {form} after")
        assert masked.startswith("before ") and masked.endswith(" after") and tail[-8:] not in masked, form
        assert redactor.holds(form)
    assert redactor.redact(f"{key}") == "***"           # a whole key is one mask, not a prefix and a mask
    assert forms("k") == [] and Redactor(["ollama"]).redact("ask ollama") == "ask ollama"
