"""Fuzz target: opening a message log whose file holds arbitrary or damaged bytes.

``LogStore.open`` must either refuse with one clean ``StoreError`` (a file that
is not a log, left untouched) or open with the valid records: at least every
record of the file's valid prefix (checked by a separate, simple reader here),
in file order, each one what it claims. What it leaves behind is a clean log:
opened again it finds the same records with nothing to repair, and takes an
append.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from gossip.core.message import Message, message_id
from gossip.fuzz.harness import FuzzFailure, captured_log, check_log, warnings
from gossip.store.log import LOG_NAME, MAGIC, MAX_RECORD_BYTES, LogStore, StoreError, encode_record

_root: Path | None = None


def scratch() -> Path:
    """An empty directory for one input (in memory when /dev/shm exists)."""
    global _root
    if _root is None:
        shm = Path("/dev/shm")
        _root = Path(tempfile.mkdtemp(prefix="gossip-fuzz-", dir=shm if shm.is_dir() else None))
    d = _root / "log"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def valid_prefix(data: bytes) -> list[bytes]:
    """Ids of the records from the start of ``data`` up to the first that is not valid."""
    ids: list[bytes] = []
    pos = len(MAGIC)
    while pos + 8 <= len(data):
        crc, length = struct.unpack_from("<II", data, pos)
        end = pos + 8 + length
        if length < 27 or length > MAX_RECORD_BYTES or end > len(data):
            break
        if zlib.crc32(data[pos + 4 : end]) != crc:
            break
        payload = data[pos + 8 : end]
        (count,) = struct.unpack_from("<H", payload, 25)
        body = 27 + 4 * count
        if payload[0] != 1 or body > length:
            break
        if hashlib.sha256(payload[body:]).digest()[:16] != payload[1:17]:
            break
        ids.append(payload[1:17])
        pos = end
    return ids


def _open(directory: Path) -> LogStore:
    return LogStore.open(
        directory, fsync="never", reactor=MemoryReactorClock(), log=Logger(namespace="fuzz.log")
    )


def log_file(data: bytes) -> None:
    """``data``: a flags byte (bit 0: the file starts with the magic), then the file."""
    if not data:
        return
    content = (MAGIC if data[0] & 1 else b"") + data[1:]
    directory = scratch()
    path = directory / LOG_NAME
    path.write_bytes(content)
    with captured_log() as events:
        try:
            store = _open(directory)
        except StoreError as e:
            if content[: len(MAGIC)] == MAGIC or MAGIC.startswith(content):
                raise FuzzFailure(f"a log with a good magic was refused: {e}") from e
            if path.read_bytes() != content:
                raise FuzzFailure("a refused file was changed") from None
            check_log(events)
            return
        except Exception as e:
            raise FuzzFailure(f"open raised {type(e).__name__}, not StoreError: {e}") from e
        try:
            order = store.ids_from(0, len(store))
            check_records(store, order)
        finally:
            store.close()
        check_log(events)
    expected = list(dict.fromkeys(valid_prefix(content)))
    if order[: len(expected)] != expected:
        missing = len(set(expected) - set(order))
        raise FuzzFailure(
            f"recovery kept {len(order)} records; the valid prefix has {len(expected)}"
            f" ({missing} of them missing or out of order)"
        )
    reopen(directory, order)


def check_records(store: LogStore, order: list[bytes]) -> None:
    if len(order) != len(store) or len(set(order)) != len(order):
        raise FuzzFailure(f"{len(store)} records but {len(set(order))} distinct ids in order")
    for mid in order:
        m = store.get(mid)
        if m is None or m.id != mid or message_id(m.body) != mid:
            raise FuzzFailure(f"record {mid.hex()} does not read back as itself")
    scanned = [m.id for m in store.scan(0)]
    if scanned != order:
        raise FuzzFailure("scan() does not give the records in arrival order")


def reopen(directory: Path, order: list[bytes]) -> None:
    """The recovered log opens clean with the same records and takes an append."""
    extra = Message(message_id(b"appended after recovery"), b"appended after recovery", 1.0, (2,))
    with captured_log() as events:
        store = _open(directory)
        try:
            again = store.ids_from(0, len(store))
            if again != order:
                raise FuzzFailure(f"reopened with {len(again)} records, not {len(order)}")
            store.add(extra)
        finally:
            store.close()
        repaired = warnings(events)
        if repaired:
            raise FuzzFailure(f"a recovered log needed repair again: {repaired[0]}")
        store = _open(directory)
        try:
            expected = order if extra.id in order else [*order, extra.id]
            if store.ids_from(0, len(store)) != expected:
                raise FuzzFailure("an append after recovery did not read back")
        finally:
            store.close()
        check_log(events)


def log_input(messages: list[Message], magic: bool = True) -> bytes:
    """The target input for a log holding ``messages`` (then mutate it)."""
    return bytes([1 if magic else 0]) + b"".join(encode_record(m) for m in messages)


def recovered_ids(content: bytes) -> list[bytes]:
    """The ids, in order, that opening a log file holding ``content`` recovers."""
    directory = scratch()
    (directory / LOG_NAME).write_bytes(content)
    store = _open(directory)
    try:
        return store.ids_from(0, len(store))
    finally:
        store.close()
