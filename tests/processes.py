"""Test helper: end every process of a session the test started (Ray daemons outlive a killed driver)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _zombie(pid: int) -> bool:
    """A process that has exited and waits to be reaped: it holds nothing, and SIGKILL cannot remove it (where
    PID 1 does not reap orphans, as in some containers, a killed Ray worker stays one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].startswith("Z")


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and not _zombie(int(entry.name)):
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def describe(pids: list[int]) -> list[str]:
    """`pid state command` of each process, for an assertion message."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            cmd, state = "?", "gone"
        out.append(f"{pid} {state} {cmd}")
    return out


def kill_session(sid: int) -> None:
    """SIGKILL everything in session `sid`, retrying for up to 30 s while processes remain."""
    for _ in range(60):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def stop_ray_node(proc) -> None:
    """End a `ray start --block` process the test started: SIGTERM (it stops what it started), then anything
    left in its session, by PID."""
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    kill_session(proc.pid)
