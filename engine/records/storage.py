"""Run storage on a local folder or any filesystem pyarrow understands (``s3://``, ...)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary sibling of ``path`` to write; renamed onto ``path`` when the block
    ends without error and removed otherwise, so readers see the old file or the whole new
    one, and concurrent writers of the same file never write into each other's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to the local file ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


class Storage:
    """A run directory: write, read and list files by relative path.

    Parameters
    ----------
    uri
        A local path or a URI pyarrow resolves (``file://``, ``s3://``, ``gs://``, ...).

    Notes
    -----
    An ``s3://`` run directory is reached as pyarrow's S3 client is configured: by
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile or instance role),
    ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible server (MinIO,
    Ceph, ...; e.g. ``http://host:9000``). With a remote run directory, everything a
    multi-node run writes goes there (the MIM base, Ray Train's checkpoints, see
    :func:`engine.train.launch.train_storage`); the endpoint travels with the filesystem
    to Ray's workers, credentials do not: every node needs its own.
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        text = str(uri)
        if "://" not in text:
            text = str(Path(text).expanduser().resolve())
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = text
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(text)
        self.uri = text  # nothing is created until the first write

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        """Full path of ``rel`` on the filesystem."""
        return f"{self.root.rstrip('/')}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` (atomically on local disks: temporary file, then rename)."""
        target = self.path(rel)
        if self.is_local:
            write_atomic(target, data)  # creates the folder too
        else:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as out:
                out.write(data)

    def write_text(self, rel: str, text: str) -> None:
        """Write UTF-8 text."""
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        """Read ``rel``."""
        with self.fs.open_input_stream(self.path(rel)) as src:
            return src.read()

    def read_text(self, rel: str) -> str:
        """Read UTF-8 text."""
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` exists."""
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str) -> list[str]:
        """Base names inside folder ``rel`` (empty when it does not exist)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in info)

    def delete_dir(self, rel: str) -> None:
        """Remove folder ``rel`` and its contents."""
        self.fs.delete_dir(self.path(rel))

    def delete_file(self, rel: str) -> None:
        """Remove file ``rel`` if it exists."""
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def remove_if_empty(self, rel: str = "") -> None:
        """Remove folder ``rel`` (default: the run folder itself) when nothing is in it."""
        path = self.path(rel).rstrip("/") if rel else self.root
        info = self.fs.get_file_info(path)
        inside = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and not inside:
            self.fs.delete_dir(path)

    def folder_exists(self) -> bool:
        """Whether the run folder itself exists."""
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound
