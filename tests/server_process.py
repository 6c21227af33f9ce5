"""Start `bios serve` as a real process on a free loopback port, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(
        self, home: Path, models: list[str], port: int | None = None, extra_args: list[str] = ()
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "bios.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--home",
            str(home),
        ]
        for model in models:
            command += ["--model", model]
        command += list(extra_args)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "BIOS_HOME": str(home / "bios-home")}
        self.log = open(home / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bios serve exited: {(self.home / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("bios serve did not start")

    def stop(self, hard: bool = False) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
