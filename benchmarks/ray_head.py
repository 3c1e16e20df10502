"""A throwaway one-node Ray cluster, for the benchmarks and the test suite (tests/conftest.py):
`ray start --head` in a session of its own, so that killing the session ends every process the
cluster started, and a watcher that does so should its starter die without stopping it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (what a process started with start_new_session=True and
    everything it started, unless they left the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def ready_file(temp_dir: Path) -> Path:
    return temp_dir.with_name(temp_dir.name + ".ready")


def end_cluster(sid: int, temp_dir: Path) -> None:
    """Kill the cluster's session and remove what it left on disk (by `stop`, or by the watcher)."""
    kill_session(sid)
    shutil.rmtree(temp_dir, ignore_errors=True)
    ready_file(temp_dir).unlink(missing_ok=True)


class RayHead:
    """`ray start --head` on a free port and a short temporary directory (Ray's socket paths have
    a length limit), in its own session; `wait` for the start, `stop` kills the session.
    `ready`: a file beside the directory for whoever waits on the start elsewhere."""

    def __init__(self, num_cpus: int, tag: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.temp_dir = Path("/tmp") / f"ef{tag}-{os.getpid()}"
        self.ready = ready_file(self.temp_dir)
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
             f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        # Should this process die without `stop` (a SIGKILL), the watcher stops the cluster: it
        # reads a pipe only this process holds open, whose end is this process's end.
        self.watcher = subprocess.Popen([sys.executable, "-c", _STOP_WHEN_ORPHANED, str(ROOT), str(self.proc.pid),
                                         str(self.temp_dir)], stdin=subprocess.PIPE, start_new_session=True)

    def wait(self) -> str:
        out, _ = self.proc.communicate(timeout=300)
        if self.proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed: {out[-2000:]}")
        return self.address

    def stop(self) -> None:
        self.watcher.kill()
        self.watcher.wait()
        end_cluster(self.proc.pid, self.temp_dir)


_STOP_WHEN_ORPHANED = """
import sys
from pathlib import Path
sys.stdin.buffer.read()
sys.path.insert(0, sys.argv[1])
from benchmarks.ray_head import end_cluster
end_cluster(int(sys.argv[2]), Path(sys.argv[3]))
"""
