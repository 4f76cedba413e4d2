"""The agent runners for real: Aider and OpenHands in a real `ohd daemon`, through ohd's agent proxy.

    python bench/agents.py [--agent aider] [--agent openhands] [--server fake] [--server local]

Not CI: the first run installs each agent into a venv cached under the user cache dir
(`ohd-bench/aider-venv`: `aider-chat`; `ohd-bench/openhands-venv`: `openhands-sdk` and
`openhands-tools`, which need Python 3.12+: `--openhands-base-python`), several minutes each.
Run it with a Python that has ohd installed.

Per agent and server, one `type: change` task (`max_attempts: 1`) on a small real repo (the
package `shop/` with ohd's example `pricing.py`), submitted over the daemon's socket, with the
agent pointed at ohd's proxy as the README says (`[agents] aider` / `openhands_python`):
- `fake`: the fake OpenRouter, whose answer is a whole-file edit of `shop/pricing.py` (Aider runs
  with `--edit-format whole` so that answer is an edit it applies); its first model answers 429
  to the first request, so the agent's request is rotated to the second model; for OpenHands,
  which works by tool calls, the second model calls its `terminal` tool (a shell edit appending
  the constant) and then its `finish` tool;
- `local`: llama.cpp's server with SmolLM2-135M (bench/localmodel.py's cached venv; the first
  run compiles it, about ten minutes).
It prints per run: the model requests through the proxy (and those that reached the server),
the models that answered, the diff's size, the validation result and the time. A tiny model
rarely produces a useful diff: what is shown is that the whole path runs and every request is
governed (counted in the governor's table, recorded as an execution).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import platformdirs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemonproc import BenchDaemon  # noqa: E402
from tests.support.fake_openrouter import FakeOpenRouter, ok, rate_limited, tool_calls  # noqa: E402
from tests.support.gitrepo import PRICING, make_repo  # noqa: E402

PACKAGES = {"aider": ["aider-chat"], "openhands": ["openhands-sdk", "openhands-tools"]}
FAKE_MODELS = ["bench/first-429", "bench/second"]
DESCRIPTION = "Add a module-level constant BENCH = 1 at the end of shop/pricing.py. Change nothing else."
WHOLE_EDIT = f"shop/pricing.py\n```python\n{PRICING.rstrip()}\n\nBENCH = 1\n```\n"
SHELL_EDIT = "printf '\\nBENCH = 1\\n' >> shop/pricing.py"   # OpenHands' terminal tool, in its workspace


def agent_venv(agent: str, base_python: str) -> Path:
    """The agent's cached venv, built on first use with `base_python`; its bin folder."""
    venv = Path(platformdirs.user_cache_dir("ohd-bench")) / f"{agent}-venv"
    probe = {"aider": "import aider.main", "openhands": "import openhands.sdk, openhands.tools.preset.default"}[agent]
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return venv / "bin"
    print(f"first run: installing {' '.join(PACKAGES[agent])} into {venv} (cached for later runs)", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    for step in ([base_python, "-m", "venv", "--clear", str(venv)], [str(python), "-m", "pip", "install", "-q",
                                                                    *PACKAGES[agent]]):
        if subprocess.run(step).returncode != 0:
            raise SystemExit(f"{' '.join(step)} failed" + (" (openhands-sdk needs Python 3.12 or later: give one "
                                                           "with --openhands-base-python)" if agent == "openhands"
                                                           else ""))
    return venv / "bin"


def agents_setting(agent: str, bin_dir: Path) -> dict[str, Any]:
    if agent == "aider":
        return {"aider": [str(bin_dir / "aider"), "--edit-format", "whole"]}
    return {"openhands_python": str(bin_dir / "python")}


def run_one(agent: str, server: str, url: str, models: list[str], workdir: Path, sent: Any,
            base_python: str) -> dict[str, Any]:
    bin_dir = agent_venv(agent, base_python)
    base = workdir / f"{agent}-{server}"
    repo = make_repo(base / "repo")
    settings = {"OHD_AGENTS": json.dumps(agents_setting(agent, bin_dir)), "OHD_MODELS": ",".join(models),
                "OHD_MODEL_SELECTION": "false", "OHD_LOG_LEVEL": "INFO"}
    started = time.monotonic()
    daemon = BenchDaemon(base, repo, url, settings)
    try:
        answer = daemon.request("POST", "/tasks", {"type": "change", "target": "shop/pricing.py", "repo": str(repo),
                                                   "description": DESCRIPTION, "runner": agent, "max_attempts": 1,
                                                   "timeout_s": 900.0})
        task_id = answer["id"]
        while (task := daemon.request("GET", f"/tasks/{task_id}"))["status"] not in ("completed", "failed",
                                                                                     "cancelled"):
            time.sleep(0.5)
    finally:
        daemon.stop()
    seconds = time.monotonic() - started
    with sqlite3.connect(daemon.db) as db:
        row = db.execute("select requests, models, length(coalesce(diff, '')), outcome, error from agent_run "
                         "where task_id = ? order by id desc limit 1", (task_id,)).fetchone()
        governed = db.execute("select count(*) from model_request").fetchone()[0]
        executions = db.execute("select model, outcome from execution where task_id = ?", (task_id,)).fetchall()
    requests, answered_by, diff_bytes, outcome, error = row or (0, None, 0, None, task.get("error"))
    return {"agent": agent, "server": server, "status": task["status"], "outcome": outcome,
            "requests_through_proxy": requests, "requests_counted": governed, "reached_server": sent(),
            "answered_by": json.loads(answered_by) if answered_by else [], "diff_bytes": diff_bytes,
            "executions": [f"{m}:{o}" for m, o in executions], "seconds": round(seconds, 1),
            "why": (error or task.get("error") or "")[:300]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", action="append", choices=sorted(PACKAGES), help="default: both")
    parser.add_argument("--server", action="append", choices=("fake", "local"), help="default: fake")
    parser.add_argument("--openhands-base-python", default="python3.12",
                        help="the interpreter OpenHands' venv is made with (openhands-sdk needs 3.12+)")
    args = parser.parse_args()
    agents, servers = args.agent or sorted(PACKAGES), args.server or ["fake"]

    def python_for(agent: str) -> str:
        return args.openhands_base_python if agent == "openhands" else sys.executable
    results = []
    with tempfile.TemporaryDirectory(prefix="ohd-bench-agents-") as tmp:
        for server in servers:
            for agent in agents:
                if server == "fake":
                    with FakeOpenRouter(models=FAKE_MODELS) as fake:
                        fake.script(FAKE_MODELS[0], [rate_limited(retry_after=600)])
                        fake.default = ok(WHOLE_EDIT)
                        if agent == "openhands":        # it works by tool calls: a shell edit, then finish
                            fake.script(FAKE_MODELS[1], [tool_calls([("terminal", {"command": SHELL_EDIT})]),
                                                         tool_calls([("finish", {"message": "Added BENCH."})])])
                        results.append(run_one(agent, server, fake.url, FAKE_MODELS, Path(tmp),
                                               lambda f=fake: len(f.completions()), python_for(agent)))
                else:
                    from bench.llamaserver import ALIAS, LlamaServer, free_port, gguf_path, llama_venv

                    python = llama_venv()
                    llama = LlamaServer(python, gguf_path(python), free_port(), Path(tmp) / "llama.log")
                    llama.start()
                    try:
                        results.append(run_one(agent, server, llama.url + "/v1", [ALIAS], Path(tmp), lambda: None,
                                               python_for(agent)))
                    finally:
                        llama.kill()
    for result in results:
        print(json.dumps(result))
    governed = all(r["requests_counted"] >= r["requests_through_proxy"] for r in results)
    print("every request through the proxy counted by the governor:", "yes" if governed else "NO")
    return 0 if governed else 1


if __name__ == "__main__":
    sys.exit(main())
