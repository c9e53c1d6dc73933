"""A private Ray head for tests that need a real cluster of their own (job submission, fake autoscaling).

Started with `ray start --head` on free loopback ports in its own short temp dir, in its own process session;
stopped by killing exactly that session's processes and their children. Never `ray stop`, which would kill
every Ray cluster on the machine (other engineers', the test session's own).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateHead:
    def __init__(self, num_cpus: float = 4, extra_args: tuple[str, ...] = (), env: dict | None = None,
                 autoscaling_config: dict | None = None):
        # short path: Ray's unix sockets live under it and must stay under 107 characters
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.gcs_address = f"127.0.0.1:{self.ports['--port']}"
        self.dashboard_url = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        # the venv first on PATH: a job's `python ...` entrypoint runs in the head's environment
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", **(env or {})}
        self.env.pop("RAY_ADDRESS")
        if autoscaling_config is not None:
            # Ray's fake multi-node provider: worker "nodes" are raylets on this machine joining this head's GCS
            provider = autoscaling_config.setdefault("provider", {})
            provider["gcs_address"] = self.gcs_address
            config_path = self.temp_dir / "autoscaling.json"
            config_path.write_text(json.dumps(autoscaling_config))
            extra_args = (*extra_args, f"--autoscaling-config={config_path}")
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--num-cpus", str(num_cpus), "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *extra_args]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        self.starter = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.pgid = self.starter.pid  # every daemon `ray start` spawns inherits this process group
        out, _ = self.starter.communicate(timeout=180)
        if self.starter.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out}")
        self.start_log = out

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this head (job submit/status/logs)."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def processes(self) -> list[psutil.Process]:
        """This head's daemons (its process group) and everything they started (workers, fake nodes, jobs)."""
        roots = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == self.pgid]
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "PrivateHead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
