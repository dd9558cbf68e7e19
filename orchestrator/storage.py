"""Where sweeps and trainers keep their state: a storage URI, read and written through `pyarrow.fs`.

`--storage` is a local path, `file://...`, `s3://bucket/prefix`, `gs://bucket/prefix` or anything else
`pyarrow.fs.FileSystem.from_uri` resolves (S3 options ride in the query string, e.g.
`s3://bucket/x?endpoint_override=http://127.0.0.1:9000&scheme=http`, or come from the usual AWS_* variables).
It stays a URI end to end: Tune and Train get `(storage_filesystem, storage_path)` from `filesystem()`, and
sweep.json, the resume listing and the final certification go through the same filesystem. A local path is
made absolute (never `Path.resolve()` on a URI: that turns `s3://b/x` into `<cwd>/s3:/b/x`).
"""
from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from orchestrator import defaults



def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def normalize(uri: str | None) -> str:
    """The storage URI of `--storage` (default $RAY_STORAGE, else orchestrator.defaults.default_storage()): a local path made absolute,
    any other URI unchanged."""
    uri = uri or os.environ.get("RAY_STORAGE") or defaults.default_storage()
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri


def redact(uri: str) -> str:
    """`uri` without credentials (user:secret@) or query options, for printing and logging."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    rest = rest.split("?", 1)[0]
    return f"{scheme}://{rest.rsplit('@', 1)[-1] if '@' in rest.split('/', 1)[0] else rest}"


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) of a storage URI; ValueError when pyarrow cannot resolve it."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError for unknown schemes
        raise ValueError(f"--storage {uri!r}: {' '.join(str(exc).split())}") from None
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri/part/...`, keeping a query string (S3 options) at the end."""
    base, sep, query = uri.partition("?")
    if "://" not in base:
        return os.path.join(base, *parts) + (sep + query if sep else "")
    return posixpath.join(base.rstrip("/"), *parts) + (sep + query if sep else "")


def read_text(uri: str) -> str | None:
    """The text of the file at `uri`, None when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write `text` to `uri` (parents created). Local files are replaced atomically."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, path)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def list_dirs(uri: str, prefix: str) -> list[str]:
    """Names of the entries directly under `uri` starting with `prefix`, sorted (none when `uri` is absent)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    return sorted(i.base_name for i in infos if i.base_name.startswith(prefix))


def upload_dir(local: str | os.PathLike, uri: str) -> None:
    """Copy the local folder `local` to `uri` (a no-op when both are the same local folder)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem) and Path(path) == Path(local).absolute():
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def local_dir(uri: str) -> Path | None:
    """The local folder of a local storage URI, else None."""
    if not is_local(uri):
        return None
    return Path(filesystem(uri)[1])


def run_config_kwargs(uri: str) -> dict[str, Any]:
    """`storage_path` and `storage_filesystem` for tune.RunConfig / ray.train.RunConfig."""
    fs, path = filesystem(uri)
    if is_local(uri):
        return {"storage_path": path}
    return {"storage_path": path, "storage_filesystem": fs}
