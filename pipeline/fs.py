"""Where stores and outputs live: local paths, or URIs that `pyarrow.fs` opens.

`s3://bucket/key`, `gs://bucket/key`, `hdfs://host/path` and `file:///abs/path` go through
`pyarrow.fs.FileSystem.from_uri`, configured from the environment as each SDK reads it
(S3: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or a
profile; GCS: `GOOGLE_APPLICATION_CREDENTIALS`). Credentials never appear in a URI: one with
a `user:secret@` part is refused, so none reaches a job file, a log line or an output row.

A plain path (no scheme) stays a `pathlib.Path` and every caller keeps its local code path
(`os.replace`, `fcntl`, SQLite). `file://` URIs become such paths too. `Location` is the
remote side: one object or prefix, with the few operations stores, outputs and jobs need.
Object stores have no rename: `move` is a server-side copy then a delete, so the destination
appears whole or not at all, and every writer writes under a hidden temporary name first.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class LocationError(ValueError):
    """A URI that cannot be opened (unknown scheme, credentials in it, no such bucket)."""


def is_uri(path: object) -> bool:
    return isinstance(path, str) and _SCHEME.match(path) is not None


def as_local_or_uri(path: str | Path) -> Path | str:
    """A Path for local paths and `file://` URIs, the URI string otherwise."""
    if isinstance(path, Path) or not is_uri(path):
        return Path(path)
    if path.lower().startswith("file://"):
        return Path(urlsplit(path).path)
    return path


def is_remote(path: object) -> bool:
    return isinstance(as_local_or_uri(path) if isinstance(path, str) else path, str)


@dataclass(frozen=True, slots=True)
class Location:
    """One object or prefix on a pyarrow filesystem. `uri` is what users see (and what
    rows name as `source`); `path` is the filesystem's own path (`bucket/key` for S3)."""

    fs: object
    path: str
    uri: str

    # -- names (the subset of pathlib that stores use) --------------------------------------
    def __str__(self) -> str:
        return self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def parent(self) -> Location:
        parent = self.path.rstrip("/").rpartition("/")[0]
        return Location(self.fs, parent, self.uri.rstrip("/").rpartition("/")[0])

    def join(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def with_name(self, name: str) -> Location:
        return self.parent.join(name)

    def relative_to(self, root: Location) -> PurePosixPath:
        return PurePosixPath(self.path).relative_to(root.path.rstrip("/"))

    # -- queries ----------------------------------------------------------------------------
    def _type(self):
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as exc:
            raise LocationError(f"cannot reach {self.uri} ({exc}); check the bucket, "
                                f"AWS_ENDPOINT_URL / AWS_REGION and the credentials in the "
                                f"environment") from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def files(self, recursive: bool = True) -> list[Location]:
        """The objects under this prefix (none when it does not exist), sorted by path."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path.rstrip("/"), recursive=recursive,
                                     allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        root = self.path.rstrip("/")
        return [self.join(i.path[len(root) + 1:]) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.File]

    # -- reads and writes -------------------------------------------------------------------
    def open_read(self) -> io.BufferedReader:
        """A buffered binary stream (lines are read a buffer at a time, never the whole object)."""
        return io.BufferedReader(self.fs.open_input_stream(self.path, compression=None),
                                 buffer_size=1 << 20)

    def open_random(self):
        """A seekable file (Parquet footers, record batches)."""
        return self.fs.open_input_file(self.path)

    def open_write(self):
        """A new object at this path; it is visible only once the stream is closed."""
        return self.fs.open_output_stream(self.path, compression=None)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path, compression=None) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Write under a hidden temporary name, then move into place."""
        tmp = self.with_name(f".{self.name}.tmp-{unique_token()}")
        with tmp.open_write() as f:
            f.write(data)
        tmp.move_to(self)

    def move_to(self, dest: Location) -> None:
        self.fs.move(self.path, dest.path)

    def delete(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)


def unique_token() -> str:
    import os
    import secrets

    return f"{os.getpid()}-{secrets.token_hex(4)}"


def location(uri: str) -> Location:
    """The Location of a remote URI; LocationError names what is wrong and the fix."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise LocationError(f"{parts.scheme}://…@{parts.netloc.rpartition('@')[2]}{parts.path}: "
                            f"credentials do not belong in a URI; set them in the environment "
                            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or the "
                            f"cloud SDK's own variables)")
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pa.ArrowInvalid is a ValueError
        raise LocationError(f"{uri}: cannot open this URI ({exc}); use s3://, gs://, hdfs:// "
                            f"or file:// (pyarrow must be built with that filesystem)") from None
    return Location(fs, path.rstrip("/") or path, uri.rstrip("/") if path.rstrip("/") else uri)


def open_local_or_remote(path: str | Path) -> Path | Location:
    """A Path for local paths and `file://` URIs, a Location for other URIs."""
    where = as_local_or_uri(path)
    return location(where) if isinstance(where, str) else where
