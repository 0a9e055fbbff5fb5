"""Run the real daemon as a subprocess on a private temporary endpoint, for integration tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sottovoce.client import Client, DaemonUnavailable


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        whisper_model: str,
        llm_model: str,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.endpoint = f"ipc://{workdir}/run/daemon.sock"
        self.log_path = workdir / "daemon.log"
        self.args = [
            sys.executable,
            "-m",
            "sottovoce.client.cli",
            "daemon",
            "--endpoint",
            self.endpoint,
            "--whisper-model",
            whisper_model,
            "--llm-model",
            llm_model,
            *(extra_args or []),
        ]
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SOTTOVOCE_RUNTIME_DIR": str(workdir / "run"),
            "SOTTOVOCE_CONFIG": str(workdir / "no-config.toml"),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True, timeout: float = 180.0) -> DaemonProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the socket answers and both models have finished loading (or failed to)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Client(self.endpoint, timeout=2, connect_timeout=1) as client:
                    if client.status().models.get("ready"):
                        return
            except DaemonUnavailable:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready after {timeout} s:\n{self.log()}")

    def client(self, **kwargs: object) -> Client:
        return Client(self.endpoint, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
