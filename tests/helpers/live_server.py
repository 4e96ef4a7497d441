"""A real SGLang HTTP server on 127.0.0.1 for the live-server suite (tests/live/): started as
``python -m sglang.launch_server`` in its own process group, bounded in time, stopped by its pid.

The server's processes get the CPU shims of ``tests/live/site`` (``sitecustomize.py``) and the side folder of
torchvision (``.venv/sglang-live``, scripts/setup.sh) on ``PYTHONPATH``; the plugin is found through its entry
point, as a user's ``launch_server`` finds it. Every server runs on SGLang's CPU engine with the flags of
:data:`CPU_ARGS`: the ones ``--kv-compress`` needs, plus a small float32 pool.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "tests" / "live" / "site"
SIDE_FOLDER = ROOT / ".venv" / "sglang-live"
READY_LINE = "The server is fired up and ready to roll!"
#: Server arguments of every live server (the ones --kv-compress requires, on SGLang's CPU engine; each
#: configuration says whether the radix cache is on).
CPU_ARGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--disable-cuda-graph",
    "--chunked-prefill-size", "-1",
    "--mem-fraction-static", "0.05",
    "--max-total-tokens", "4096",
    "--dtype", "float32",
)  # fmt: skip
#: Seconds a server may take to start (about 100 s on 2 idle cores).
START_TIMEOUT_S = 600
#: Seconds the server is given to exit on SIGTERM before its process group is killed.
STOP_GRACE_S = 20


class ServerFailed(RuntimeError):
    """The server exited, or did not become ready in time; the message ends with the tail of its log."""


@dataclass
class LiveServer:
    """One server configuration: ``name`` (for the log file), the model folder and the extra server arguments."""

    name: str
    model_dir: Path
    args: tuple[str, ...]
    log_dir: Path
    port: int = 0
    process: subprocess.Popen | None = None
    start_seconds: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait (at most :data:`START_TIMEOUT_S`) until it serves a generation."""
        self.port = free_port()
        env = live_env(self.env)
        command = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_dir),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *CPU_ARGS,
            *self.args,
        ]  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        begin = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        try:
            self._wait_ready(begin + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - begin

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"server {self.name} exited with {self.process.returncode}\n{self.log_tail()}")
            ready = READY_LINE in self.log_path.read_text(errors="replace")
            if ready and self.get("/health_generate", timeout=120)[0] == 200:
                return
            time.sleep(1)
        raise ServerFailed(f"server {self.name} not ready after {START_TIMEOUT_S} s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group (its pid), SIGKILL after :data:`STOP_GRACE_S`."""
        if self.process is None:
            return
        pid = self.process.pid
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(pid):
                break
        self.process = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- plain HTTP -----------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 60) -> tuple[int, object]:
        return self._call(urllib.request.Request(self.base_url + path), timeout)

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, object]:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return self._call(request, timeout)

    @staticmethod
    def _call(request: urllib.request.Request, timeout: float) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


def live_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the live servers' shims (``tests/live/site``) and torchvision's side folder
    on ``PYTHONPATH``, offline Hugging Face libraries, SGLang's CPU engine, and ``extra``."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(SITE), str(SIDE_FOLDER), env.get("PYTHONPATH")) if p),
        LIGHTKV_LIVE_SHIMS="1",
        SGLANG_USE_CPU_ENGINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **(extra or {}),
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
