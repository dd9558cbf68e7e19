"""Test helper: a real S3-compatible server (moto's) on a free 127.0.0.1 port, as a subprocess of the test.

`s3_server` (session-scoped fixture) yields an `S3` with `uri(prefix)`: an s3:// URI pyarrow.fs (and so Ray)
resolves, carrying the endpoint and credentials in the URI, so every process and node that gets the URI (or a
pyarrow filesystem unpickled from it) reaches the same bucket without environment variables.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

KEY, SECRET, BUCKET = "testing", "testingsecret", "orchestrator-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str | None = None) -> str:
        prefix = prefix or uuid.uuid4().hex[:8]
        return (f"s3://{KEY}:{SECRET}@{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"
                f"&region=us-east-1")

    def keys(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
        out, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto")
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("the moto S3 server did not start")
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield S3(port)
    finally:
        os.killpg(proc.pid, 9) if proc.poll() is None else None
        proc.wait(timeout=10)
