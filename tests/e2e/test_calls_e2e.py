"""`ohd show ID --calls`: the prompt and the answer of each model call, from a real daemon run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ohd.store.calls import MARKER, cap, render
from tests.e2e.helpers import DaemonProcess, daemon_env, fake_openrouter
from tests.support.waiting import wait_for

KEY = "sk-or-v1-calls-secret-0077"
TASK = "type: unit_test\ntarget: shop/pricing.py\n"
ANSWER = """```python
from shop.pricing import total


def test_total() -> None:
    assert total([1.0]) == 1.0
```
"""


def _run(repo: Path, tmp_path: Path, answer: str, **extra: str) -> tuple[str, dict[str, object], Path]:
    (tmp_path / "answer.md").write_text(answer)
    with fake_openrouter("--latency-ms", "10", "--content-file", str(tmp_path / "answer.md")) as url:
        env = daemon_env(tmp_path, Path(os.environ["OHD_RUNTIME_DIR"]), OPENROUTER_API_KEY=KEY, OHD_BASE_URL=url,
                         OHD_MODELS="fake/model-a:free", **extra)
        daemon = DaemonProcess(env, repo, tmp_path / "daemon.log").start()
        try:
            (repo / "tasks.d" / "one.yaml").write_text(TASK)
            wait_for(lambda: daemon.json("show", "1")["status"] in ("completed", "failed"), timeout=60,
                     what="task 1 done")
        finally:
            daemon.stop()
        text = daemon.ohd("show", "1", "--calls").stdout          # the daemon is down: reads the store
        data = json.loads(daemon.ohd("show", "1", "--calls", "--json").stdout)
    return text, data, tmp_path / "state"


def test_show_calls_prints_the_prompt_and_the_answer_and_never_the_key(repo: Path, tmp_path: Path) -> None:
    text, data, state = _run(repo, tmp_path, ANSWER)
    assert "--- prompt ---" in text and "shop/pricing.py" in text
    assert "--- response ---" in text and "def test_total() -> None:" in text
    calls = data["calls"]
    assert isinstance(calls, list) and calls[0]["model"].startswith("fake/model-a") and "[user]" in calls[0]["prompt"]
    for path in state.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_an_oversized_answer_is_stored_truncated_with_a_marker(repo: Path, tmp_path: Path) -> None:
    big = ANSWER + "# " + "x" * 5000 + "\n"
    text, data, _ = _run(repo, tmp_path, big, OHD_CALL_HISTORY_MAX_BYTES="1000")
    assert "[... truncated by ohd:" in text
    response = data["calls"][0]["response"]
    assert response.startswith(ANSWER[:20]) and len(response.encode()) < 1100


def test_cap_and_render() -> None:
    assert cap("short", 1000) == "short"
    cut = cap("é" * 1000, 1001)
    assert cut.endswith(MARKER.format(omitted=999)) and cut.startswith("é" * 500)
    assert render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "[system]\ns\n\n[user]\nu"
