"""Acceptance bench for the model governor (issue 3): free models behind a rate limit.

    python bench/ratelimit.py            # 200 tasks, 5 models x 20 req / 60 s, 16 workers (~1 min)
    python bench/ratelimit.py --quick    # 40 tasks, 2 models x 10 req / window, 16 workers

A fake OpenRouter (tests/support/fake_openrouter.py) serves `--models` free models
(`bench/model-N:free`), each allowed `--rpm` requests per sliding `--window` seconds
(a 429 with `X-RateLimit-Limit/Remaining/Reset` beyond that) and answering in 200 ms
with a valid pytest module, so every task that gets an answer is accepted. A real
`ohd daemon` process with `--workers` workers and those models gets `--tasks` unit_test
tasks over its socket API (POST /tasks); the clock runs from the first POST until every
task is completed or failed.

The ideal: the models together admit models*rpm requests per window, so
ceil(tasks / (models*rpm)) - 1 full windows must pass, and then the last batch goes
through the workers at one answer per worker per 200 ms (never less than the workers
alone need). For the default workload: 1 x 60 s + ceil(100/16) x 0.2 s = 61.4 s.
(The LiteLLM reference figures in issue 3 -- 62.8 s "96%", 64.0 s "94%" -- are relative
to a flat 60 s; against this ideal they would read 97.8% and 95.9%.)

The daemon is told the limits through its settings (OHD_FREE_RPM = --rpm, OHD_FREE_RPD
high enough never to bind; only keys config.py has are set, and the run prints them).
The window goes to OHD_QUOTA_WINDOW_S; with a daemon that has no such setting (it then
assumes 60 s) --quick uses a 60 s window (~1 min) instead of 10 s (~15 s), since a 10 s
server window would measure the mismatch, not the governor.

Goals: every task completed, ideal/actual >= 97%, at most 5 wasted 429s (every 429
the server sent is one request that did no work). Exit status 0 on PASS, 1 on FAIL.

When `litellm` is importable the same request workload also runs through LiteLLM's
Router (rpm-aware routing plus a retry loop, each "task" one completion, nothing
validated or written) against a fresh fake server, for a side-by-side line.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon, add_daemon_env, daemon_env
from tests.support.fake_openrouter import FakeOpenRouter, ok
from tests.support.gitrepo import make_repo

LATENCY_S = 0.2
SETTLE_S = 0.05
TARGET_RATIO = 0.97
MAX_WASTED_429 = 5
ANSWER = """```python
from shop.pricing import total


def test_total() -> None:
    assert total([1.0, 2.0]) == 3.0
```"""


@dataclass(frozen=True)
class Workload:
    tasks: int
    models: int
    rpm: int           # requests per model per window
    window_s: float
    workers: int
    latency_s: float = LATENCY_S

    @property
    def model_ids(self) -> list[str]:
        return [f"bench/model-{i}:free" for i in range(1, self.models + 1)]

    def ideal_s(self) -> float:
        """The shortest possible run: full windows to wait, then the last batch through the workers."""
        per_window = self.models * self.rpm
        full_windows = math.ceil(self.tasks / per_window) - 1
        last_batch = self.tasks - full_windows * per_window
        rate_bound = full_windows * self.window_s + math.ceil(last_batch / self.workers) * self.latency_s
        worker_bound = math.ceil(self.tasks / self.workers) * self.latency_s
        return max(rate_bound, worker_bound)

    def describe(self) -> str:
        return (f"{self.tasks} tasks, {self.models} free models x {self.rpm} req / {self.window_s:g} s "
                f"sliding window, {self.latency_s * 1000:.0f} ms answers, {self.workers} workers")


@dataclass
class Result:
    label: str
    elapsed_s: float
    completed: int
    failed: int
    requests: int
    rate_limited: int
    timed_out: bool = False
    per_model: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (requests, 429s)
    note: str = ""


def server_counts(server: FakeOpenRouter) -> tuple[int, int, dict[str, tuple[int, int]]]:
    completions = server.completions()
    sent = Counter(r.model for r in completions)
    limited = Counter(r.model for r in completions if r.status == 429)
    per_model = {str(m): (sent[m], limited[m]) for m in sorted(sent, key=str)}
    return len(completions), sum(limited.values()), per_model


def timeline(server: FakeOpenRouter, start: float, work: Workload) -> str:
    """When requests went out, and how long a model's window stayed free before it was used again.

    The reuse lag: for each model, its (rpm+1)-th admitted request arrived this long after
    its first admitted request left the window (first + window); the worst model is shown.
    Zero is perfect pacing; the margin a governor keeps shows up here.
    """
    completions = server.completions()
    if not completions:
        return "no requests"
    arrivals = [r.at - start for r in completions]
    text = f"requests went out from +{min(arrivals):.2f} s to +{max(arrivals):.2f} s"
    lags = []
    for model in {r.model for r in completions}:
        admitted = sorted(r.at for r in completions if r.model == model and r.status != 429)
        if len(admitted) > work.rpm:
            lags.append(admitted[work.rpm] - (admitted[0] + work.window_s))
    if lags:
        text += f"; window reuse lag (worst model) {max(lags) * 1000:.0f} ms"
    return text


# --- ohd ----------------------------------------------------------------------------------


WINDOW_KEYS = ("quota_window_s",)  # the daemon setting(s) for the window, first found is used
DAEMON_WINDOW_S = 60.0  # what the governor assumes (ohd.routing.WINDOW) when it cannot be told


def daemon_fields() -> set[str]:
    from ohd.config import Settings

    return set(Settings.model_fields)


def window_key() -> str | None:
    """The daemon setting for the rate-limit window, if config.py has one."""
    return next((key for key in WINDOW_KEYS if key in daemon_fields()), None)


def margin_s() -> float | None:
    """The daemon's default safety margin on the window, if it has one (for the printout)."""
    from ohd.config import Settings

    spec = Settings.model_fields.get("quota_margin_s")
    return float(spec.default) if spec is not None and isinstance(spec.default, (int, float)) else None


def governor_env(work: Workload) -> dict[str, str]:
    """Daemon settings the governor may need, set only for keys config.py actually has.

    (Unknown OHD_* variables are ignored by config.py, so filtering keeps the printout honest.)
    """
    fields = daemon_fields()
    wanted = {
        "free_rpm": str(work.rpm),                    # the per-model limit, as OpenRouter documents it
        "free_rpd": str(max(1000, 5 * work.tasks)),   # per key per UTC day: never the limit here
    }
    key = window_key()
    if key is not None:
        wanted[key] = f"{work.window_s:g}"
    return {f"OHD_{name.upper()}": value for name, value in wanted.items() if name in fields}


def Daemon(base: Path, repo: Path, url: str, work: Workload, extra_env: dict[str, str]) -> BenchDaemon:  # noqa: N802
    """A real `ohd daemon` process (bench/daemonproc.py) with this workload's settings."""
    settings = {"OHD_MODELS": ",".join(work.model_ids), "OHD_WORKERS": str(work.workers),
                "OHD_SETTLE_S": str(SETTLE_S), **extra_env}
    return BenchDaemon(base, repo, url, settings)


def run_ohd(work: Workload, base: Path, timeout_s: float, log_level: str, more_env: dict[str, str]) -> Result:
    with FakeOpenRouter(latency_s=work.latency_s, models=work.model_ids) as server:
        server.default = ok(ANSWER)
        server.rate_limit(work.rpm, work.window_s)
        extra = governor_env(work)
        print(f"fake OpenRouter at {server.url}")
        print(f"daemon settings for the governor: {' '.join(f'{k}={v}' for k, v in extra.items()) or '(none)'}")
        if more_env:
            print(f"extra daemon settings (--daemon-env): {' '.join(f'{k}={v}' for k, v in more_env.items())}")
            extra = {**extra, **more_env}
        repo = make_repo(base / "repo")
        daemon = Daemon(base / "ohd", repo, server.url, work, {**extra, "OHD_LOG_LEVEL": log_level})
        try:
            start = time.monotonic()
            for n in range(work.tasks):
                reply = daemon.request("POST", "/tasks", {"type": "unit_test", "target": "shop/pricing.py",
                                                          "output": f"tests/test_bench_{n}.py", "repo": str(repo)})
                if not reply or "id" not in reply:
                    raise SystemExit(f"POST /tasks refused task {n}: {reply}")
            submitted = time.monotonic() - start
            deadline = start + timeout_s
            timed_out = False
            while True:
                counts = daemon.counts()
                done = counts.get("completed", 0) + counts.get("failed", 0)
                if done >= work.tasks:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - start
            counts = daemon.counts()
        finally:
            daemon.stop()
        requests, limited, per_model = server_counts(server)
        when = timeline(server, start, work)
    written = sum(1 for n in range(work.tasks) if (repo / "tests" / f"test_bench_{n}.py").is_file())
    note = (f"{when}\n  outputs written: {written}; {work.tasks} POSTs took {submitted:.2f} s (inside the time); "
            f"daemon log {daemon.log}")
    return Result("ohd", elapsed, counts.get("completed", 0), counts.get("failed", 0), requests, limited,
                  timed_out, per_model, note)


# --- LiteLLM, for comparison ---------------------------------------------------------------


def run_litellm(work: Workload, timeout_s: float) -> Result:
    """The same requests through LiteLLM's Router: rpm-aware routing and a retry loop around it.

    Each job is one completion (no validation, no files). A rate-limit error (from a
    model's 429 or from the Router finding no deployment under its rpm) waits 1 s and
    tries again; any other error also retries until the deadline, then counts as failed.
    """
    import litellm
    from litellm import Router

    litellm.suppress_debug_info = True
    with FakeOpenRouter(latency_s=work.latency_s, models=work.model_ids) as server:
        server.default = ok(ANSWER)
        server.rate_limit(work.rpm, work.window_s)
        router = Router(
            model_list=[{"model_name": "bench", "litellm_params": {
                "model": f"openai/{model}", "api_base": server.url, "api_key": "sk-bench", "rpm": work.rpm}}
                for model in work.model_ids],
            routing_strategy="usage-based-routing-v2", num_retries=0)
        messages = [{"role": "user", "content": "Write a pytest module for shop/pricing.py"}]
        errors: Counter[str] = Counter()

        async def one(deadline: float) -> bool:
            while time.monotonic() < deadline:
                try:
                    await router.acompletion(model="bench", messages=messages, timeout=30)
                    return True
                except Exception as exc:  # noqa: BLE001 - every error class is counted, then retried
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(1.0)
            return False

        async def main() -> tuple[int, int]:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for n in range(work.tasks):
                queue.put_nowait(n)
            deadline = time.monotonic() + timeout_s
            outcomes: list[bool] = []

            async def worker() -> None:
                while not queue.empty():
                    queue.get_nowait()
                    outcomes.append(await one(deadline))

            await asyncio.gather(*(worker() for _ in range(work.workers)))
            return sum(outcomes), len(outcomes) - sum(outcomes)

        start = time.monotonic()
        completed, failed = asyncio.run(main())
        elapsed = time.monotonic() - start
        requests, limited, per_model = server_counts(server)
        when = timeline(server, start, work)
    version = getattr(litellm, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version("litellm")
        except Exception:  # noqa: BLE001
            version = "?"
    note = f"{when}\n  litellm {version}; client-side errors retried: {dict(errors) or 'none'}"
    return Result("LiteLLM Router (rpm-aware + retry loop)", elapsed, completed, failed, requests, limited,
                  False, per_model, note)


# --- report ---------------------------------------------------------------------------------


def report(result: Result, work: Workload, ideal: float, *, of: str = "", verdict: bool = True,
           target: float = TARGET_RATIO, wasted: int = MAX_WASTED_429) -> bool:
    """Print one run against its ideal (`of`: what that ideal counts) and, with `verdict`, PASS or FAIL
    against the goal (`target`: the least share of the ideal; `wasted`: the most 429s)."""
    ratio = ideal / result.elapsed_s if result.elapsed_s > 0 else 0.0
    all_done = result.completed == work.tasks
    fast = ratio >= target and not result.timed_out
    frugal = result.rate_limited <= wasted
    print(f"[{result.label}]")
    print(f"  completion time: {result.elapsed_s:6.1f} s{' (TIMED OUT)' if result.timed_out else ''}"
          f" against the ideal {ideal:.1f} s{of} -> {ratio * 100:.1f}% of the ideal")
    print(f"  requests the server received: {result.requests} (minimum {work.tasks})")
    print(f"  429s the server sent (wasted): {result.rate_limited}")
    print(f"  tasks: {result.completed} completed, {result.failed} failed"
          f"{f', {work.tasks - result.completed - result.failed} unfinished' if result.timed_out else ''}"
          f" of {work.tasks}")
    print("  per model (requests/429s): " + ", ".join(f"{m.split('/')[-1]} {r}/{w}"
                                                      for m, (r, w) in result.per_model.items()))
    if result.note:
        print(f"  {result.note}")
    passed = all_done and fast and frugal
    if verdict:
        verdicts = [f"all {work.tasks} completed: {'yes' if all_done else 'NO'}",
                    f">= {target * 100:.0f}% of the ideal: {'yes' if fast else 'NO'}",
                    f"<= {wasted} wasted 429s: {'yes' if frugal else 'NO'}"]
        print(f"  {'PASS' if passed else 'FAIL'} ({'; '.join(verdicts)})")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=None, help="tasks to submit (default 200; --quick 40)")
    parser.add_argument("--models", type=int, default=None, help="free models (default 5; --quick 2)")
    parser.add_argument("--rpm", type=int, default=None,
                        help="requests per model per window (default 20; --quick 10)")
    parser.add_argument("--window", type=float, default=None,
                        help="the server's sliding window in seconds (default 60; --quick 10 if the daemon "
                             "has a window setting, else 60)")
    parser.add_argument("--workers", type=int, default=16, help="daemon workers (default 16)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 40 tasks, 2 models x 10 per 10 s window (~15 s), or per 60 s "
                             "(~1 min) while the daemon cannot be told the window")
    parser.add_argument("--log-level", default="WARNING", help="the daemon's log level (its log path is printed)")
    add_daemon_env(parser)
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM comparison even if installed")
    args = parser.parse_args()
    settable = window_key() is not None
    # --quick wants a 10 s window; a daemon that cannot be told the window paces for 60 s,
    # so a 10 s server window would measure the mismatch, not the governor.
    quick_window = 10.0 if settable else DAEMON_WINDOW_S
    defaults = (40, 2, 10, quick_window) if args.quick else (200, 5, 20, 60.0)
    work = Workload(tasks=args.tasks or defaults[0], models=args.models or defaults[1], rpm=args.rpm or defaults[2],
                    window_s=args.window or defaults[3], workers=args.workers)
    if args.quick and not settable and args.window is None:
        print(f"note: the daemon has no setting for the rate-limit window (tried {', '.join(WINDOW_KEYS)}); "
              f"it assumes {DAEMON_WINDOW_S:g} s, so --quick uses a {DAEMON_WINDOW_S:g} s window (~1 min)")
    elif work.window_s != DAEMON_WINDOW_S and not settable:
        print(f"WARNING: the daemon has no setting for the rate-limit window and assumes {DAEMON_WINDOW_S:g} s; "
              f"against a {work.window_s:g} s server window its figures measure that mismatch, not the governor")
    if min(work.tasks, work.models, work.rpm, work.workers) < 1 or work.window_s <= 0:
        parser.error("--tasks, --models, --rpm, --workers and --window must be positive")
    ideal = work.ideal_s()
    margin = margin_s()
    if work.window_s < DAEMON_WINDOW_S and margin:
        print(f"note: fixed delays weigh more against a {work.window_s:g} s window: the governor's safety "
              f"margin (quota_margin_s = {margin:g} s) alone is {margin / ideal * 100:.1f}% of this ideal")
    timeout_s = max(120.0, 10 * ideal)
    per_window = work.models * work.rpm
    print(f"workload: {work.describe()}")
    print(f"ideal: ({math.ceil(work.tasks / per_window)} - 1) windows x {work.window_s:g} s + last batch "
          f"through {work.workers} workers at {work.latency_s * 1000:.0f} ms = {ideal:.1f} s")
    base = Path(tempfile.mkdtemp(prefix="ohd-bench-ratelimit-"))
    more_env = daemon_env(parser, args.daemon_env)
    passed = report(run_ohd(work, base, timeout_s, args.log_level, more_env), work, ideal)
    if args.no_litellm:
        print("LiteLLM comparison skipped (--no-litellm)")
    else:
        try:
            import litellm  # noqa: F401
        except ImportError:
            print("LiteLLM comparison skipped: litellm is not installed")
        else:
            try:
                report(run_litellm(work, timeout_s), work, ideal)
            except Exception as exc:  # noqa: BLE001 - the comparison is optional; say why it broke
                print(f"LiteLLM comparison failed: {type(exc).__name__}: {exc}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
