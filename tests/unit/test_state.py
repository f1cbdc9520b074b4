"""Unit tests for meshd.state: atomic writes, file modes, and every way a data dir can be bad."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd import state as state_mod
from meshd.state import SCHEMA, SCHEMA_VERSION, DataDir, StateError, atomic_write

DEAD_PID = 99_999_999  # above any Linux pid_max (2**22), so never a live process


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def dd(tmp_path: Path) -> DataDir:
    d = DataDir(tmp_path / "data")
    d.ensure()
    return d


def write_raw_state(dd: DataDir, data: bytes) -> Path:
    path = dd.path / "state.json"
    path.write_bytes(data)
    return path


def raw_doc(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# ---------------------------------------------------------------------- round trips and modes


def test_state_round_trip(dd: DataDir) -> None:
    state = {"node": {"name": "ä-node", "seq": 3}, "members": [1, 2.5, None, True], "x": ""}
    assert not dd.is_initialised()
    dd.write_state(state)
    assert dd.is_initialised()
    assert dd.read_state() == state


def test_state_file_is_readable_schema_versioned_json(dd: DataDir) -> None:
    dd.write_state({"b": 1, "a": [1]})
    text = (dd.path / "state.json").read_text()
    doc = json.loads(text)
    assert doc["schema"] == SCHEMA
    assert doc["version"] == SCHEMA_VERSION
    assert text.endswith("}\n")
    assert text.index('"a"') < text.index('"b"')  # sort_keys
    assert '\n  "a": [' in text  # indent=2


def test_write_state_rejects_reserved_keys(dd: DataDir) -> None:
    with pytest.raises(ValueError, match="reserved"):
        dd.write_state({"version": 7})
    assert not dd.is_initialised()


def test_key_round_trip_and_format(dd: DataDir) -> None:
    secret = bytes(range(256))
    assert not dd.has_key("node")
    dd.write_key("node", secret)
    assert dd.has_key("node")
    assert dd.read_key("node") == secret
    content = (dd.path / "node.key").read_bytes()
    assert content == base64.b64encode(secret) + b"\n"
    assert content.count(b"\n") == 1


def test_file_modes(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "a" / "b" / "data")
    old = os.umask(0o002)  # a permissive umask must not widen anything
    try:
        dd.ensure()
        dd.write_state({"k": 1})
        dd.write_key("wg", b"\x01" * 32)
    finally:
        os.umask(old)
    assert mode_of(dd.path) == 0o700
    assert mode_of(dd.path / "state.json") == 0o644
    assert mode_of(dd.path / "wg.key") == 0o600


def test_modes_are_exact_under_restrictive_umask(dd: DataDir) -> None:
    old = os.umask(0o077)
    try:
        dd.write_state({"k": 1})
    finally:
        os.umask(old)
    assert mode_of(dd.path / "state.json") == 0o644


def test_ensure_keeps_existing_dir_mode(tmp_path: Path) -> None:
    path = tmp_path / "existing"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    DataDir(path).ensure()
    assert mode_of(path) == 0o755


def test_ensure_on_a_regular_file_is_state_error(tmp_path: Path) -> None:
    path = tmp_path / "notadir"
    path.write_text("x")
    with pytest.raises(StateError, match="not a directory") as exc:
        DataDir(path).ensure()
    assert str(path) in str(exc.value)


def test_secret_never_exists_with_wider_mode(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file is created with 0600 directly, not created 0644 and chmodded later."""
    seen: list[int] = []
    real_open = os.open

    def spy_open(path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            seen.append(mode)
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    dd.write_key("ca", b"s" * 32)
    assert seen == [0o600]


@pytest.mark.parametrize("name", ["", "A", "a/b", "../x", "x.key", "a" * 33, "ü"])
def test_invalid_key_names(dd: DataDir, name: str) -> None:
    with pytest.raises(ValueError, match="invalid key name"):
        dd.write_key(name, b"x")
    with pytest.raises(ValueError):
        dd.read_key(name)
    with pytest.raises(ValueError):
        dd.has_key(name)


def test_empty_secret_is_refused(dd: DataDir) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        dd.write_key("token", b"")
    assert not dd.has_key("token")


def test_key_names_at_the_limits(dd: DataDir) -> None:
    for name in ("a", "0_-z", "k" * 32):
        dd.write_key(name, b"v")
        assert dd.read_key(name) == b"v"


# ---------------------------------------------------------------------- read_state errors


def assert_state_error(dd: DataDir, *fragments: str) -> StateError:
    with pytest.raises(StateError) as info:
        dd.read_state()
    err = info.value
    msg = str(err)
    path = dd.path / "state.json"
    assert err.path == path
    assert msg.startswith(f"state file {path} "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    assert "\n" not in msg
    return err


def test_missing_state(dd: DataDir) -> None:
    assert_state_error(dd, "does not exist; run `meshd init` or `meshd join` first")


def test_missing_data_dir(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "nope")
    assert not dd.is_initialised()
    assert_state_error(dd, "does not exist")


def test_corrupt_state_message_has_position(dd: DataDir) -> None:
    write_raw_state(dd, b"{\n  nope")
    err = assert_state_error(dd, "is corrupt: invalid JSON at line 2 column 3")
    assert err.reason.startswith("is corrupt")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "is corrupt: the file is empty"),
        (b"  \n", "is corrupt: the file is empty"),
        (b"\xff\xfe{}", "is corrupt: invalid UTF-8 at byte 0"),
        (b'{"schema": "meshd.state", "version": 1, "a": [1, 2', "is corrupt: invalid JSON"),
        (b'{"schema": "meshd.state", "version": 1, "n": NaN}', "is corrupt: invalid JSON"),
        (b'{"schema": "meshd.state", "version": 1, "n": ' + b"9" * 5000 + b"}", "invalid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "is corrupt"),
        (b"[1, 2]", "is not a meshd state file (it holds an array, not an object)"),
        (b'"hello"', "is not a meshd state file (it holds a string"),
        (b"null", "is not a meshd state file (it holds null"),
        (b"42", "is not a meshd state file (it holds a number"),
        (b"true", "is not a meshd state file (it holds a boolean"),
        (b"{}", "is not a meshd state file (no schema field)"),
        (raw_doc(schema="other.thing", version=1), "is not a meshd state file (schema 'other"),
        (raw_doc(schema=SCHEMA), "is corrupt: it has no schema version"),
        (raw_doc(schema=SCHEMA, version="1"), "is corrupt: invalid schema version '1'"),
        (raw_doc(schema=SCHEMA, version=True), "invalid schema version True"),
        (raw_doc(schema=SCHEMA, version=0), "invalid schema version 0"),
        (raw_doc(schema=SCHEMA, version=1.0), "invalid schema version 1.0"),
        (
            raw_doc(schema=SCHEMA, version=SCHEMA_VERSION + 1),
            f"was written by a newer meshd (schema version {SCHEMA_VERSION + 1})",
        ),
    ],
)
def test_bad_state_files(dd: DataDir, data: bytes, fragment: str) -> None:
    path = write_raw_state(dd, data)
    before = path.stat()
    assert_state_error(dd, fragment)
    after = path.stat()
    assert path.read_bytes() == data
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert dd.is_initialised()  # a corrupt state file still blocks a fresh init


def test_truncated_state(dd: DataDir) -> None:
    dd.write_state({"payload": "x" * 1000, "list": list(range(100))})
    path = dd.path / "state.json"
    data = path.read_bytes()
    for cut in (1, 10, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        assert_state_error(dd, "is corrupt")


def test_error_message_does_not_flood(dd: DataDir) -> None:
    write_raw_state(dd, raw_doc(schema="x" * 10_000, version=1))
    err = assert_state_error(dd, "is not a meshd state file")
    assert len(str(err)) < 200 + len(str(dd.path))


def test_unreadable_state(dd: DataDir) -> None:
    (dd.path / "state.json").mkdir()
    assert_state_error(dd, "cannot be read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_state(dd: DataDir) -> None:
    path = write_raw_state(dd, b"{}")
    path.chmod(0)
    assert_state_error(dd, "cannot be read: Permission denied")


def test_read_state_never_alters_a_valid_file(dd: DataDir) -> None:
    dd.write_state({"a": 1})
    path = dd.path / "state.json"
    before, data = path.stat(), path.read_bytes()
    for _ in range(3):
        dd.read_state()
    after = path.stat()
    assert path.read_bytes() == data
    assert (after.st_mtime_ns, after.st_ino, after.st_mode) == (
        before.st_mtime_ns,
        before.st_ino,
        before.st_mode,
    )
    assert sorted(os.listdir(dd.path)) == ["state.json"]


def test_state_error_pickles() -> None:
    err = StateError("/x/state.json", "is corrupt: boom")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) == "state file /x/state.json is corrupt: boom"
    assert (copy.path, copy.reason) == (err.path, err.reason)


def test_state_error_kinds() -> None:
    assert str(StateError(Path("/d/wg.key"), "x")) == "key file /d/wg.key x"
    assert str(StateError(Path("/d/run.json"), "x")) == "file /d/run.json x"
    assert str(StateError(Path("/d"), "x", "data directory")) == "data directory /d x"


# ---------------------------------------------------------------------- read_key errors


def assert_key_error(dd: DataDir, name: str, *fragments: str) -> None:
    path = dd.path / f"{name}.key"
    with pytest.raises(StateError) as info:
        dd.read_key(name)
    msg = str(info.value)
    assert info.value.path == path
    assert msg.startswith(f"key file {path} "), msg
    for fragment in fragments:
        assert fragment in msg, msg


def write_raw_key(dd: DataDir, name: str, data: bytes, mode: int = 0o600) -> None:
    path = dd.path / f"{name}.key"
    path.write_bytes(data)
    path.chmod(mode)


def test_missing_key(dd: DataDir) -> None:
    assert_key_error(dd, "wg", "does not exist")


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"not base64!\n", b"QUJD\nREVG\n", b"QUJ\n", b"\xff\xfe\n", b"====\n"],
)
def test_bad_key_content(dd: DataDir, data: bytes) -> None:
    write_raw_key(dd, "wg", data)
    assert_key_error(dd, "wg", "is corrupt")


def test_hand_written_key_with_surrounding_whitespace_is_accepted(dd: DataDir) -> None:
    write_raw_key(dd, "wg", b"  QUJD \r\n")
    assert dd.read_key("wg") == b"ABC"


@pytest.mark.parametrize(
    ("mode", "word"),
    [(0o644, "readable"), (0o640, "readable"), (0o604, "readable"), (0o620, "accessible")],
)
def test_key_with_wide_mode_is_refused(dd: DataDir, mode: int, word: str) -> None:
    dd.write_key("node", b"secret")
    path = dd.path / "node.key"
    path.chmod(mode)
    assert_key_error(
        dd, "node", f"has mode {mode:04o}; it must not be {word} by others (chmod 600 {path})"
    )
    path.chmod(0o400)  # narrower than 0600 is fine
    assert dd.read_key("node") == b"secret"


def test_key_that_is_a_directory(dd: DataDir) -> None:
    (dd.path / "wg.key").mkdir(mode=0o700)
    assert dd.has_key("wg")
    with pytest.raises(StateError, match=r"wg\.key"):
        dd.read_key("wg")


def test_dangling_key_symlink_counts_as_present(dd: DataDir) -> None:
    (dd.path / "ca.key").symlink_to(dd.path / "gone")
    assert dd.has_key("ca")
    assert_key_error(dd, "ca", "does not exist")


# ---------------------------------------------------------------------- failed writes


def test_failed_replace_leaves_old_file_and_no_temp(
    dd: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    dd.write_state({"gen": 1})
    dd.write_key("wg", b"old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        dd.write_state({"gen": 2})
    with pytest.raises(OSError, match="No space"):
        dd.write_key("wg", b"new")
    monkeypatch.undo()
    assert dd.read_state() == {"gen": 1}
    assert dd.read_key("wg") == b"old"
    assert sorted(os.listdir(dd.path)) == ["state.json", "wg.key"]


def test_failed_write_midway_leaves_no_temp(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    dd.write_state({"gen": 1})

    def short_then_fail(fd: int, data: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "write", short_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        dd.write_state({"gen": 2})
    monkeypatch.undo()
    assert dd.read_state() == {"gen": 1}
    assert temp_files(dd.path) == []


def test_short_writes_are_completed(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def dribble(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", dribble)
    dd.write_state({"payload": "y" * 500})
    monkeypatch.undo()
    assert dd.read_state() == {"payload": "y" * 500}


def test_interrupt_during_fsync_cleans_up(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    dd.write_key("wg", b"old")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dd.write_key("wg", b"new")
    monkeypatch.undo()
    assert dd.read_key("wg") == b"old"
    assert temp_files(dd.path) == []


@pytest.mark.parametrize(
    "bad",
    [{"x": object()}, {"x": float("nan")}, {"x": "\ud800"}, {"x": {1: 2, "a": 3}}],
)
def test_unencodable_state_changes_nothing(dd: DataDir, bad: dict[str, Any]) -> None:
    dd.write_state({"gen": 1})
    data = (dd.path / "state.json").read_bytes()
    with pytest.raises((TypeError, ValueError)):
        dd.write_state(bad)
    assert (dd.path / "state.json").read_bytes() == data
    assert temp_files(dd.path) == []


def test_atomic_write_into_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "f", b"x")


def test_atomic_write_replaces_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write(target, b"new", mode=0o644)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o644
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------------- ensure / remove_all


def make_temp(dd: DataDir, target: str, pid: int, age: float = 0.0) -> Path:
    path = dd.path / f".{target}.{pid}.0123456789abcdef.tmp"
    path.write_bytes(b"partial")
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_ensure_removes_stale_temp_files_only(dd: DataDir) -> None:
    dd.write_state({"a": 1})
    dead = make_temp(dd, "state.json", DEAD_PID)
    dead_key = make_temp(dd, "wg.key", DEAD_PID)
    mine_fresh = make_temp(dd, "node.key", os.getpid())
    mine_old = make_temp(dd, "ca.key", os.getpid(), age=state_mod.STALE_TEMP_AGE + 60)
    # Not ours: similar-looking names that do not match the exact pattern.
    foreign = [
        dd.path / ".state.json.tmp",
        dd.path / "state.json.1.0123456789abcdef.tmp",
        dd.path / ".state.json.1.0123456789ABCDEF.tmp",
        dd.path / ".state.json.x.0123456789abcdef.tmp",
        dd.path / "notes.txt",
    ]
    for path in foreign:
        path.write_text("keep me")
    dir_lookalike = dd.path / f".x.{DEAD_PID}.0123456789abcdef.tmp"
    dir_lookalike.mkdir()

    dd.ensure()

    assert not dead.exists() and not dead_key.exists() and not mine_old.exists()
    assert mine_fresh.exists()  # this process may be writing it right now
    assert all(p.exists() for p in foreign)
    assert dir_lookalike.is_dir()
    assert dd.read_state() == {"a": 1}


def test_ensure_keeps_temp_of_live_writer(dd: DataDir) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = make_temp(dd, "state.json", proc.pid)
        dd.ensure()
        assert live.exists()
    finally:
        proc.kill()
        proc.wait()
    dd.ensure()
    assert not live.exists()


def test_temp_name_matches_ensure_pattern(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The names atomic_write really uses are the ones ensure() recognises."""
    names: list[str] = []

    def fail(src: Any, dst: Any) -> None:
        names.append(Path(src).name)
        raise OSError("stop")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        dd.write_state({"a": 1})
    assert len(names) == 1
    assert state_mod._TEMP_NAME.fullmatch(names[0])
    assert names[0].startswith(".state.json.")


def test_remove_all(dd: DataDir) -> None:
    dd.write_key("node", b"k")
    dd.write_key("wg", b"k")
    dd.write_state({"a": 1})
    (dd.path / "other").write_text("keep")
    dd.remove_all(["node.key", "wg.key", "ca.key", "state.json"])  # ca.key never existed
    assert sorted(os.listdir(dd.path)) == ["other"]
    assert not dd.is_initialised()
    dd.remove_all(["state.json"])  # idempotent
    assert dd.path.is_dir()


def test_remove_all_removes_state_first(dd: DataDir, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_unlink = os.unlink

    def spy(path: Any, *a: Any, **kw: Any) -> None:
        order.append(Path(path).name)
        real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", spy)
    dd.remove_all(["node.key", "state.json"])
    assert order == ["state.json", "node.key"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b"])
def test_remove_all_rejects_paths(dd: DataDir, name: str) -> None:
    with pytest.raises(ValueError):
        dd.remove_all([name])


def test_remove_all_never_removes_the_directory(tmp_path: Path) -> None:
    dd = DataDir(tmp_path / "d")
    dd.remove_all(["state.json"])  # missing directory: best effort, no error
    dd.ensure()
    dd.remove_all([])
    assert dd.path.is_dir()


# ---------------------------------------------------------------------- property tests

PROPS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)
state_dicts = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in ("schema", "version")), json_values, max_size=8
)


@PROPS
@given(data=st.binary(max_size=2000))
def test_arbitrary_bytes_give_dict_or_state_error(dd: DataDir, data: bytes) -> None:
    write_raw_state(dd, data)
    try:
        result = dd.read_state()
    except StateError as exc:
        assert str(exc).startswith(f"state file {dd.path / 'state.json'} ")
    else:
        assert isinstance(result, dict)
    assert (dd.path / "state.json").read_bytes() == data


@PROPS
@given(doc=json_values, schema=st.sampled_from([SCHEMA, "x", None]), version=json_values)
def test_arbitrary_json_gives_dict_or_state_error(
    dd: DataDir, doc: Any, schema: str | None, version: Any
) -> None:
    """Near-valid documents reach the schema/version checks that random bytes rarely do."""
    if isinstance(doc, dict):
        doc = {**doc, "schema": schema, "version": version}
    write_raw_state(dd, json.dumps(doc).encode())
    try:
        result = dd.read_state()
    except StateError:
        return
    assert isinstance(result, dict)
    assert version == SCHEMA_VERSION and type(version) is int and schema == SCHEMA


@settings(PROPS, max_examples=75)  # each example fsyncs twice; keep the unit suite fast
@given(state=state_dicts)
def test_arbitrary_state_round_trips(dd: DataDir, state: dict[str, Any]) -> None:
    dd.write_state(state)
    assert dd.read_state() == state
    assert temp_files(dd.path) == []


@PROPS
@given(secret=st.binary(min_size=1, max_size=300))
def test_arbitrary_key_round_trips(dd: DataDir, secret: bytes) -> None:
    dd.write_key("k", secret)
    assert dd.read_key("k") == secret
