"""Test helper: the lines of a command's stderr that the command itself wrote.

Ray forwards its daemons' and workers' log lines to the driver's stderr with a prefix naming their source:
"(raylet) ...", "(raylet, ip=10.0.0.2) ...", "(CertifyWorker pid=123) ...", "(pid=123) ...", coloured with ANSI
escapes. They are Ray's, not the tool's: a CI machine whose /tmp was over 95% full printed raylet's
file_system_monitor warning between our single error line and the test's assertion. "One clear line" is about
the tool's own output, so the tests count these.
"""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((raylet|gcs_server|autoscaler|pid=\d+|\w+ pid=\d+)\b[^)]*\)")


def ours(err: str) -> list[str]:
    """stderr's non-empty lines without the ones Ray forwarded from its processes."""
    lines = (_ANSI.sub("", line).strip() for line in err.splitlines())
    return [line for line in lines if line and not _RAY_PREFIX.match(line)]
