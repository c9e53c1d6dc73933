"""A private Ray head for tests that need a real cluster of their own (job submission, fake autoscaling, several
nodes).

Started with `ray start --head` on free loopback ports in its own short temp dir, in its own process session;
stopped by killing exactly that session's processes and their children. Never `ray stop`, which would kill
every Ray cluster on the machine (other engineers', the test session's own).

Token authentication is on, as with Ray's defaults for a user: `RAY_AUTH_MODE=token` for the head and every client
started through `env`, and the token in Ray's default place (`ray get-auth-token --generate` creates
~/.ray/auth_token when missing, and keeps it when present).

`default_temp_dir=True` gives the head a private `RAY_TMPDIR` instead of `--temp-dir`: it then records itself in
what Ray treats as the default temp dir (`$RAY_TMPDIR/ray/ray_current_cluster`), exactly as a user's plain
`ray start --head` does, for clients started with `env`. `add_node()` starts a worker node (its own raylet, its own
temp dir and process group) that joins with `ray start --address`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from raylm.runtime import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
README_ADDRESS = "http://127.0.0.1:8265"  # what the README's commands use; tests put their head's in
README_OUTPUT = "$PWD/outputs/quickstart"
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port")


class PrivateHead:
    def __init__(self, num_cpus: float = 4, extra_args: tuple[str, ...] = (), env: dict | None = None,
                 autoscaling_config: dict | None = None, head_args: tuple[str, ...] | None = None,
                 default_temp_dir: bool = False):
        # short path: Ray's unix sockets live under it and must stay under 107 characters
        self.root = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
        self.temp_dir = self.root / "ray" if default_temp_dir else self.root
        self.ports = {flag: free_port() for flag in PORT_FLAGS}
        self.gcs_address = f"127.0.0.1:{self.ports['--port']}"
        self.dashboard_url = f"http://127.0.0.1:{self.ports['--dashboard-port']}"
        self.nodes: list[WorkerNode] = []
        # the venv first on PATH: a job's `python ...` entrypoint runs in the head's environment
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "", **(env or {})}
        self.env.pop("RAY_ADDRESS")
        if default_temp_dir:
            self.env["RAY_TMPDIR"] = str(self.root)
        ensure_auth_token(self.env)
        if autoscaling_config is not None:
            # Ray's fake multi-node provider: worker "nodes" are raylets on this machine joining this head's GCS
            provider = autoscaling_config.setdefault("provider", {})
            provider["gcs_address"] = self.gcs_address
            config_path = self.root / "autoscaling.json"
            config_path.write_text(json.dumps(autoscaling_config))
            extra_args = (*extra_args, f"--autoscaling-config={config_path}")
            self.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        head_args = head_args if head_args is not None else ("--head", "--num-cpus", str(num_cpus))
        cmd = [str(BIN / "ray"), "start", *head_args, "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--disable-usage-stats", *extra_args]
        if not default_temp_dir:
            cmd += ["--temp-dir", str(self.temp_dir)]
        for flag, port in self.ports.items():
            cmd += [flag, str(port)]
        self.start_cmd = cmd
        self.starter = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.pgid = self.starter.pid  # every daemon `ray start` spawns inherits this process group
        out, _ = self.starter.communicate(timeout=180)
        if self.starter.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out}")
        self.start_log = out

    def add_node(self, num_cpus: float, resources: dict | None = None) -> "WorkerNode":
        """A worker node: `ray start --address <this head>` with its own raylet, temp dir and process group."""
        node = WorkerNode(self, num_cpus, resources or {})
        self.nodes.append(node)
        return node

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this head (job submit/status/logs)."""
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def processes(self) -> list[psutil.Process]:
        """This head's daemons (its process group) and everything they started (workers, fake nodes, jobs)."""
        return group_processes(self.pgid)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        kill_processes(self.processes())
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PrivateHead":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerNode:
    """One worker node of a PrivateHead; `kill()` takes the whole node down (raylet, its workers), like a lost VM."""

    def __init__(self, head: PrivateHead, num_cpus: float, resources: dict):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
        self.resources = resources
        cmd = [str(BIN / "ray"), "start", "--address", head.gcs_address, "--num-cpus", str(num_cpus),
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
               "--resources", json.dumps(resources)]
        for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"):
            cmd += [flag, str(free_port())]
        starter = subprocess.Popen(cmd, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        self.pgid = starter.pid
        out, _ = starter.communicate(timeout=180)
        if starter.returncode != 0:
            self.kill()
            raise RuntimeError(f"ray start --address failed:\n{out}")

    def kill(self) -> None:
        kill_processes(group_processes(self.pgid), sig=signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def ensure_auth_token(env: dict) -> None:
    """Ray's token in its default place (~/.ray/auth_token), created only when missing (what a user runs once)."""
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def group_processes(pgid: int) -> list[psutil.Process]:
    """A process group's members and all their descendants (Ray workers may sit in groups of their own)."""
    roots = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(found.values())


def kill_processes(procs: list[psutil.Process], sig: int = signal.SIGTERM) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ------------------------------------------------------------------------------ the README's commands, as jobs
def readme_commands(heading: str = "### 1. A local head") -> list[str]:
    """The shell commands of the README block under `heading`, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(heading):].split("```", 2)[1]
    joined = block.replace("\\\n", " ")
    return [" ".join(shlex.split(line, comments=True)) for line in joined.splitlines()
            if shlex.split(line, comments=True)]


def readme_command(prefix: str) -> str:
    return next(c for c in readme_commands() if c.startswith(prefix))


def job_state(head: PrivateHead, job_id: str) -> tuple[str, str]:
    """(state, logs) of a submitted job: SUCCEEDED / FAILED / STOPPED / RUNNING / PENDING / UNKNOWN."""
    status = head.ray("job", "status", "--address", head.dashboard_url, job_id, timeout=60)
    # the CLI logs its answer ("Status for job '...': SUCCEEDED") to stderr, with terminal colours
    status = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    logs = head.ray("job", "logs", "--address", head.dashboard_url, job_id, timeout=60).stdout
    # terminal states read "Job 'ID' succeeded" / "failed" / "was stopped"; others "Status for job 'ID': RUNNING"
    m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)|Status for job '[^']+': (?:JobStatus\.)?([A-Z]+)", status)
    state = ({"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}.get(m.group(1)) or m.group(2)
             if m else "UNKNOWN")
    return state, logs


def submit_argv(head: PrivateHead, argv: list[str], timeout: float = 420, wait: bool = True) -> tuple[str, str, str]:
    """Run a `ray job submit ...` argv from the checkout with the head's env; returns (id, state, logs)."""
    job_id = f"raylm-test-{uuid.uuid4().hex[:8]}"
    assert argv[:3] == ["ray", "job", "submit"], argv
    argv = [str(BIN / "ray"), "job", "submit", "--submission-id", job_id, *([] if wait else ["--no-wait"]), *argv[3:]]
    proc = subprocess.run(argv, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    state, logs = job_state(head, job_id)
    return job_id, state, logs + proc.stderr[-3000:]


def readme_submit(head: PrivateHead, entry: str, out: Path, *extra: str, timeout: float = 420, wait: bool = True):
    """The README's `ray job submit ... python jobs/<entry>` line, pointed at this head and `out`, `extra` appended."""
    line = readme_command(f"ray job submit --address {README_ADDRESS} --working-dir . -- python jobs/{entry}")
    assert README_OUTPUT in line
    argv = shlex.split(line.replace(README_ADDRESS, head.dashboard_url).replace(README_OUTPUT, str(out)))
    return submit_argv(head, [*argv, *extra], timeout=timeout, wait=wait)


# "(RayTrainWorker pid=123, ...) [raylm train] worker rank 0: device cpu, ..., node <id>" as forwarded to the driver
DEVICE_LINE = re.compile(r"pid=(\d+)[^\n]*?\[raylm train\] worker rank (\d+): device (\S+), DeepSpeed accelerator "
                         r"(\S+), backend (\S+), node (\S+)")


def device_choices(logs: str) -> list[tuple[int, str, str, str, str]]:
    """Every training worker's `[raylm train] worker rank R: device ...` line: (rank, device, accelerator, backend,
    node id), once per worker process, in log order (a restarted worker group logs again, from new processes)."""
    seen, out = set(), []
    for m in DEVICE_LINE.finditer(logs):
        if m.group(1) not in seen:  # the same line can reach the job's log twice
            seen.add(m.group(1))
            out.append((int(m.group(2)), *m.groups()[2:]))
    return out


def log_tail(logs: str, chars: int = 6000) -> str:
    """The end of a job's log for an assertion message, without Ray Data's progress-bar redraws."""
    lines = [ln for ln in logs.splitlines() if "\x1b[A" not in ln and "row/s]" not in ln and ln.strip()]
    return "\n".join(lines)[-chars:]
