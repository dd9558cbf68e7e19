"""A certification's output directory: its manifest, its shards, its lock -- the on-disk format that makes
`orchestrator.certify` resumable and refuses to mix models, settings or data (orchestrator/pool.py runs the pool).

    out/manifest.json      format, model fingerprint, settings, data provenance, "complete"
    out/shards/shard-000000.tsv ...   one atomically written TSV per finished shard (written by the driver only)
    out/.lock              an exclusive fcntl lock while a certification runs
    out/<split>.tsv        Cohen's rows sorted by idx, once every shard is done
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from orchestrator.cli_common import UsageError
from orchestrator.provenance import differences as _differences

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
MANIFEST_FORMAT = "smoothing-orchestrator/certify-manifest/1"
LOCK_FILE = ".lock"
#: the data provenance a resume must match (manifest["data"]). "root" and "source" (where the files were, which
#: loader read them) are recorded but not compared: the same examples moved to another folder or node are the
#: same data, and examples_sha256 (their content) says whether they are
DATA_COMPARED = ("dataset", "split", "recipe", "examples_sha256", "num_examples")

class CertifyInputError(UsageError, ValueError):
    """Bad input (settings, model, output directory): the CLI prints it on one line and exits with code 2."""



def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_tsv(rows_or_df, path: Path, meta: Mapping[str, Any] | None = None) -> None:
    from trainables.metrics import write_sidecar, write_tsv

    if meta:  # the JSON sidecar beside the final name first: the TSV's appearance marks completion
        write_sidecar(path, meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-", suffix=".tsv")
    os.close(fd)
    try:
        write_tsv(rows_or_df, tmp, meta={})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / SHARD_DIR / f"shard-{shard:06d}.tsv"


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CertifyInputError(f"{path} is not valid JSON ({exc}); use another --out") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CertifyInputError(f"{path} is not a certification manifest; use another --out")
    return manifest


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse (CertifyInputError) an output directory that cannot hold a certification, before anything is
    written: a file, a path under a file, a read-only place, or a non-empty folder that is not one of ours."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertifyInputError(f"--out {out} is a file, not a directory; choose another --out")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CertifyInputError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise CertifyInputError(f"--out {out}: {existing} is not writable (read-only filesystem or "
                                "permissions); choose another --out")
    if out.is_dir() and read_manifest(out) is None and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise CertifyInputError(f"{out} is not empty and holds no {MANIFEST}; choose another --out")


@contextmanager
def exclusive_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `out_dir/.lock` (creating out_dir) for the duration: two certify
    processes never compute the same shards at once. (fcntl locks are per host; on a network filesystem they
    are as good as its lock support.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise CertifyInputError(f"{out_dir} is in use by another certification (pid {holder}); wait for it "
                                    "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)      # releases the lock


def check_resume(out_dir: Path, fingerprint: str, data: Mapping[str, Any] | None, old: dict | None = None) -> None:
    """Refuse to continue `out_dir` with another model or other data (one line listing every difference).
    Cheap and free of side effects: the CLI calls it before Ray starts."""
    old = read_manifest(out_dir) if old is None else old
    if old is None:
        return
    if old["model"]["fingerprint"] != fingerprint:
        raise CertifyInputError(
            f"{out_dir} holds shards of another model ({old['model'].get('source') or '?'}, fingerprint "
            f"{old['model']['fingerprint'][:12]}, not {fingerprint[:12]}); choose another --out")
    if data is not None:
        if "data" not in old:
            raise CertifyInputError(f"{out_dir} records no data provenance (an older version wrote it), so "
                                    "its shards cannot be proven to be of these data; choose another --out")
        shown = _differences(old["data"], data, DATA_COMPARED)
        if shown:
            raise CertifyInputError(f"{out_dir} holds shards of other data ({shown}); resume with the data "
                                    "it was started on (--data-root), or choose another --out")


def prepare_out_dir(out_dir: Path, manifest: dict, resume: bool) -> None:
    """Create `out_dir` with `manifest`, or check that an existing one holds this model, these settings and
    these data (dataset, split, recipe, data source, content hash of the examples)."""
    old = read_manifest(out_dir)
    if old is None:
        if out_dir.exists() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
            raise CertifyInputError(f"{out_dir} is not empty and holds no {MANIFEST}; choose another --out")
        (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        return
    check_resume(out_dir, manifest["model"]["fingerprint"], manifest.get("data"), old)
    if old["settings"] != manifest["settings"]:
        shown = _differences(old["settings"], manifest["settings"], sorted(manifest["settings"]))
        raise CertifyInputError(f"{out_dir} holds shards certified with other settings ({shown}); "
                                "use the same settings to resume, or choose another --out")
    done = list((out_dir / SHARD_DIR).glob("shard-*.tsv"))
    if done and not resume:
        raise CertifyInputError(f"{out_dir} already holds {len(done)} finished shards; resume them or choose "
                                "another output directory")
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)


__all__ = ["DATA_COMPARED", "atomic_write_text", "atomic_write_tsv", "LOCK_FILE", "MANIFEST", "MANIFEST_FORMAT", "SHARD_DIR", "CertifyInputError",
           "check_out_dir", "check_resume", "exclusive_lock", "prepare_out_dir", "read_manifest", "shard_path"]
