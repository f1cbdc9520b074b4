"""Crash-safe persistence of a node's data directory.

A data directory holds ``state.json`` (human-readable, schema-versioned, mode 0644) and one
file per secret, ``<name>.key`` (mode 0600, one line of base64). Every file is replaced
atomically (temp file, fsync, rename, fsync of the directory), so after a crash or power loss
each file is either its old or its new version, never a mix. The presence of ``state.json``
marks the directory initialised.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SCHEMA = "meshd.state"
SCHEMA_VERSION = 1
STATE_FILE = "state.json"
# Seconds after which a temp file is stale even if a process with its pid exists.
STALE_TEMP_AGE = 300.0

_KEY_NAME = re.compile(r"[a-z0-9_-]{1,32}")
# ".<target>.<pid>.<16 hex>.tmp": the pid lets ensure() tell a crashed writer's leftover
# from a file another live process is writing right now.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>[0-9]{1,10})\.[0-9a-f]{16}\.tmp")


class StateError(Exception):
    """The data directory is unusable; str() names the file and the problem in one sentence.

    e.g. "state file /var/lib/meshd/state.json is corrupt: invalid JSON at line 1 column 5".
    ``reason`` continues the sentence after the path ("is corrupt: ...").
    """

    def __init__(self, path: Path | str, reason: str, kind: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.kind = kind or _kind_of(self.path)
        # All fields in args so the exception survives pickling (multiprocessing, logging).
        super().__init__(self.path, reason, self.kind)

    def __str__(self) -> str:
        return f"{self.kind} {self.path} {self.reason}"


def _kind_of(path: Path) -> str:
    if path.name == STATE_FILE:
        return "state file"
    if path.suffix == ".key":
        return "key file"
    return "file"


def _short(value: object, limit: int = 40) -> str:
    """repr() for error messages, bounded so a corrupt file cannot flood the log."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in ``directory`` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers and crashes see old or new, never a mix.

    The temp file is created with ``mode`` from the start (umask can only narrow it), so a
    secret never exists on disk with wider permissions than its final ones.
    """
    path = Path(path)
    tmp = _temp_path(path)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # exact mode regardless of umask; only ever widens up to `mode`
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:  # never for a regular file; guards against an endless loop
                    raise OSError(f"write to {tmp} made no progress")
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        # OSError: already renamed, or the directory vanished; nothing left to clean.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _is_stale(entry: os.DirEntry[str], pid: int) -> bool:
    """A temp file is stale once its writer is gone, or it is too old to be mid-write.

    The age rule covers pid reuse (after a reboot, or a container restarting meshd as pid 1).
    """
    if pid != os.getpid() and not _pid_alive(pid):
        return True
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False  # its writer renamed it just now
    return time.time() - mtime > STALE_TEMP_AGE


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True


class DataDir:
    """A node's data directory; all writes are atomic, all read failures are StateError."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    def key_path(self, name: str) -> Path:
        """Path of key ``name``; the name is restricted so it can never escape the directory."""
        if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
            raise ValueError(f"invalid key name {_short(name)}: must match [a-z0-9_-]{{1,32}}")
        return self.path / f"{name}.key"

    # ------------------------------------------------------------------ directory

    def ensure(self) -> None:
        """Create the directory (0700 if new) and drop temp files left by crashed writers.

        Only names matching this module's temp pattern are touched, and only once their writer
        process is gone (or they are too old to be mid-write), so a concurrent writer in
        another live process is never disturbed.
        """
        try:
            if not self.path.is_dir():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.path.mkdir(mode=0o700)
                    os.chmod(self.path, 0o700)  # mkdir's mode is subject to umask
                except FileExistsError:
                    if not self.path.is_dir():
                        raise StateError(
                            self.path, "exists but is not a directory", "data directory"
                        ) from None
            removed = False
            with os.scandir(self.path) as entries:
                for entry in entries:
                    match = _TEMP_NAME.fullmatch(entry.name)
                    if match is None or not entry.is_file(follow_symlinks=False):
                        continue
                    if not _is_stale(entry, int(match["pid"])):
                        continue
                    try:
                        os.unlink(entry.path)
                        removed = True
                    except FileNotFoundError:
                        pass
            if removed:
                _fsync_dir(self.path)
        except StateError:
            raise
        except OSError as exc:
            raise StateError(
                self.path, f"cannot be prepared: {exc.strerror or exc}", "data directory"
            ) from None

    def is_initialised(self) -> bool:
        """True once ``state.json`` exists, even if corrupt (so init never overwrites it)."""
        return os.path.lexists(self.state_path)

    def remove_all(self, names: Iterable[str]) -> None:
        """Best-effort removal of files in the directory (rolls back a failed init/join).

        ``state.json`` goes first, so a crash half-way leaves an uninitialised directory
        rather than a state file without its keys. The directory itself is kept.
        """
        names = list(names)
        for name in names:
            if not name or name in (".", "..") or "/" in name or "\0" in name:
                raise ValueError(f"remove_all takes plain file names, got {_short(name)}")
        names.sort(key=lambda n: n != STATE_FILE)
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(self.path / name)
        with contextlib.suppress(OSError):
            _fsync_dir(self.path)

    # ------------------------------------------------------------------ state.json

    def read_state(self) -> dict[str, Any]:
        """Parse and validate ``state.json`` (without the schema fields); never modifies it."""
        path = self.state_path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise StateError(
                path, "does not exist; run `meshd init` or `meshd join` first"
            ) from None
        except OSError as exc:
            raise StateError(path, f"cannot be read: {exc.strerror or exc}") from None
        if not raw.strip():
            raise StateError(path, "is corrupt: the file is empty")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError(path, f"is corrupt: invalid UTF-8 at byte {exc.start}") from None
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            msg = exc.msg[:1].lower() + exc.msg[1:]
            raise StateError(
                path, f"is corrupt: invalid JSON at line {exc.lineno} column {exc.colno} ({msg})"
            ) from None
        except (ValueError, RecursionError) as exc:
            # NaN/Infinity, integers beyond the int-parsing limit, absurd nesting.
            raise StateError(path, f"is corrupt: invalid JSON ({exc})") from None
        if not isinstance(doc, dict):
            found = {list: "an array", str: "a string", bool: "a boolean"}.get(
                type(doc), "null" if doc is None else "a number"
            )
            raise StateError(path, f"is not a meshd state file (it holds {found}, not an object)")
        schema = doc.pop("schema", None)
        if schema != SCHEMA:
            found = "no schema field" if schema is None else f"schema {_short(schema)}"
            raise StateError(path, f"is not a meshd state file ({found})")
        if "version" not in doc:
            raise StateError(path, "is corrupt: it has no schema version")
        version = doc.pop("version")
        if type(version) is not int or version < 1:
            raise StateError(path, f"is corrupt: invalid schema version {_short(version)}")
        if version > SCHEMA_VERSION:
            raise StateError(
                path,
                f"was written by a newer meshd (schema version {version}); "
                f"this meshd understands up to version {SCHEMA_VERSION}",
            )
        return doc

    def write_state(self, state: Mapping[str, Any]) -> None:
        """Atomically replace ``state.json``; ``schema`` and ``version`` are added here."""
        reserved = {"schema", "version"} & set(state)
        if reserved:
            raise ValueError(f"state must not contain the reserved keys {sorted(reserved)}")
        doc = {"schema": SCHEMA, "version": SCHEMA_VERSION, **state}
        # Encode fully before touching the disk: an unencodable state changes nothing.
        text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        atomic_write(self.state_path, (text + "\n").encode("utf-8"), mode=0o644)

    # ------------------------------------------------------------------ keys

    def write_key(self, name: str, secret: bytes) -> None:
        """Atomically write a secret (mode 0600 from creation on) as one base64 line."""
        path = self.key_path(name)
        if not isinstance(secret, bytes | bytearray | memoryview) or not len(secret):
            raise ValueError(f"key {name!r}: secret must be non-empty bytes")
        atomic_write(path, base64.b64encode(secret) + b"\n", mode=0o600)

    def has_key(self, name: str) -> bool:
        """True if the key file is present (a dangling symlink counts, so read_key reports it)."""
        return os.path.lexists(self.key_path(name))

    def read_key(self, name: str) -> bytes:
        """Read a secret, refusing (like ssh) a key file that group or others can access."""
        path = self.key_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StateError(path, "does not exist") from None
        except OSError as exc:
            raise StateError(path, f"cannot be read: {exc.strerror or exc}") from None
        try:
            # fstat the open file, not the path, so the checked file is the one read.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateError(path, "is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                what = "readable" if mode & 0o044 else "accessible"
                raise StateError(
                    path,
                    f"has mode {mode:04o}; it must not be {what} by others (chmod 600 {path})",
                )
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise StateError(path, f"cannot be read: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        try:
            text = raw.decode("ascii").strip()
            if not text:
                raise StateError(path, "is corrupt: the file is empty")
            secret = base64.b64decode(text, validate=True)
        except (UnicodeDecodeError, binascii.Error):
            raise StateError(path, "is corrupt: not a line of valid base64") from None
        if not secret:
            raise StateError(path, "is corrupt: the key is empty")
        return secret


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
