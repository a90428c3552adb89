"""The message log's on-disk record format: the one place that defines it.

All integers little-endian::

    file    = magic record*
    magic   = b"GSPLOG1\n"                        (8 bytes)
    record  = crc32 (u32) | length (u32) | payload  (length bytes)
    payload = kind (u8, 1 = message)
            | id (16 bytes)
            | received_at (f64, seconds since the epoch)
            | path count (u16)
            | path entries (u32 each, origin first)
            | body (the rest of the payload: the message's UTF-8 bytes)

``crc32`` is ``zlib.crc32`` over the 4 length bytes followed by the payload, so
a damaged length field is caught by the checksum too. A payload is at least
27 bytes (kind, id, received_at, path count) and at most ``MAX_RECORD_BYTES``
(1 MiB); a length field outside those bounds is corruption. A record is also
corrupt when its kind is not 1, its path entries run past its end, or its id is
not ``message_id(body)`` (the first 16 bytes of SHA-256 over the body). Records
follow each other with no padding. The same id may appear more than once (after
a crash the node can fetch back a message it had already written); the first
record wins and later ones are ignored.

"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from gossip.core.message import ID_BYTES, Message

MAGIC = b"GSPLOG1\n"
KIND_MESSAGE = 1
MAX_RECORD_BYTES = 1 << 20  # largest payload (length field) accepted
MAX_PATH = 0xFFFF

HEADER = struct.Struct("<II")  # crc32, length
FIXED = struct.Struct(f"<B{ID_BYTES}sdH")  # kind, id, received_at, path count
LEN = struct.Struct("<I")
HEADER_BYTES = HEADER.size  # 8
MIN_PAYLOAD = FIXED.size  # 27
# Bytes of a record before its path entries: what plausible() reads.
FIXED_SPAN = HEADER_BYTES + MIN_PAYLOAD


# length | kind | id | received_at | path count | path entries: a record after its
# crc and before its body, one Struct per path length (paths are as long as a
# cluster is wide, so there are few), built when first needed.
_HEADS: dict[int, struct.Struct] = {}


def _head(count: int) -> struct.Struct:
    head = _HEADS.get(count)
    if head is None:
        head = _HEADS[count] = struct.Struct(f"<IB{ID_BYTES}sdH{count}I")
    return head


def encode_record(message: Message) -> bytes:
    """The bytes of one log record for ``message`` (header included).

    On the hot path (every received message): one cached ``Struct`` packs
    everything but the crc and the body, one concatenation and one ``crc32``
    over length + payload, one more for the crc in front.
    """
    return _encode(message.id, message.body, message.received_at, message.path)


def _encode(mid: bytes, body: bytes, received_at: float, path: tuple[int, ...]) -> bytes:
    """``encode_record`` of a message given by its fields."""
    count = len(path)
    if len(mid) != ID_BYTES:
        raise ValueError(f"a message id has {ID_BYTES} bytes, got {len(mid)}")
    if count > MAX_PATH:
        raise ValueError(f"a path has at most {MAX_PATH} entries, got {count}")
    length = MIN_PAYLOAD + 4 * count + len(body)
    if length > MAX_RECORD_BYTES:
        raise ValueError(f"a record has at most {MAX_RECORD_BYTES} bytes, got {length}")
    try:
        rest = _head(count).pack(length, KIND_MESSAGE, mid, received_at, count, *path)
    except struct.error as e:
        raise ValueError(f"cannot encode message: {e}") from None
    rest += body
    return LEN.pack(zlib.crc32(rest)) + rest


# length | kind | id | received_at: the part of a record before its path entries.
_LEAD = struct.Struct(f"<IB{ID_BYTES}sd")
_LEAD_BYTES = _LEAD.size - LEN.size  # the payload's part of it: kind, id, received_at
# Encoded paths (path count | entries) kept between batches, up to this many.
_PATHS_KEPT = 4096


class _EncodedPaths(dict[tuple[int, ...], bytes]):
    """Path -> its bytes in a record (count, entries), packed and checked once: the
    messages of a cluster come by few paths. Bounded: cleared when full."""

    def __missing__(self, path: tuple[int, ...]) -> bytes:
        count = len(path)
        if count > MAX_PATH:
            raise ValueError(f"a path has at most {MAX_PATH} entries, got {count}")
        try:
            encoded = struct.pack(f"<H{count}I", count, *path)
        except struct.error as e:
            raise ValueError(f"cannot encode message: {e}") from None
        if len(self) >= _PATHS_KEPT:
            self.clear()
        self[path] = encoded
        return encoded


_PATHS = _EncodedPaths()


def encode_records(
    ids: Sequence[bytes],
    bodies: Sequence[bytes],
    paths: Sequence[tuple[int, ...]],
    received_at: float,
) -> tuple[bytes, list[int]]:
    """The records of messages received together (the new messages of one frame, one
    ``received_at``), given as parallel columns: their bytes, each record exactly what
    ``encode_record`` gives for its message, one after the other, and where each starts.

    One pass over the columns, no object per message: per message one ``pack``
    (length, kind, id, received_at), the path's bytes from ``_PATHS``, one join and
    one ``crc32``. Raises ``ValueError`` for a batch with a message ``encode_record``
    refuses (then nothing is returned).
    """
    if not len(ids) == len(bodies) == len(paths):
        raise ValueError(f"columns of {len(ids)} ids, {len(bodies)} bodies, {len(paths)} paths")
    pack, encoded_paths, crc32, pack_crc = _LEAD.pack, _PATHS, zlib.crc32, LEN.pack
    pieces: list[bytes] = []
    starts: list[int] = []
    at = 0
    try:
        for mid, body, path in zip(ids, bodies, paths, strict=True):
            if len(mid) != ID_BYTES:
                raise ValueError(f"a message id has {ID_BYTES} bytes, got {len(mid)}")
            encoded_path = encoded_paths[path]
            length = _LEAD_BYTES + len(encoded_path) + len(body)
            if length > MAX_RECORD_BYTES:
                raise ValueError(f"a record has at most {MAX_RECORD_BYTES} bytes, got {length}")
            rest = b"".join((pack(length, KIND_MESSAGE, mid, received_at), encoded_path, body))
            pieces += (pack_crc(crc32(rest)), rest)
            starts.append(at)
            at += HEADER_BYTES + length
    except struct.error as e:
        raise ValueError(f"cannot encode message: {e}") from None
    return b"".join(pieces), starts


def decode_payload(buf: bytes, start: int, end: int) -> Message:
    """The message in an already checked payload ``buf[start:end]``."""
    _kind, mid, received_at, count = FIXED.unpack_from(buf, start)
    p = start + MIN_PAYLOAD
    path = struct.unpack_from(f"<{count}I", buf, p) if count else ()
    return Message(mid, buf[p + 4 * count : end], received_at, path)


def decode_record(buf: bytes, i: int) -> Message | None:
    """The message in the record at ``buf[i:]`` if its length, checksum and kind check
    out, else None. (Reading back what this store wrote: the id is not hashed again.)"""
    crc, length = HEADER.unpack_from(buf, i)
    end = i + HEADER_BYTES + length
    if (
        length < MIN_PAYLOAD
        or end > len(buf)
        or zlib.crc32(buf[i + 4 : end]) != crc
        or buf[i + HEADER_BYTES] != KIND_MESSAGE
    ):
        return None
    return decode_payload(buf, i + HEADER_BYTES, end)


def plausible(buf: bytes, i: int) -> int | None:
    """The payload length of the record header at ``buf[i:]`` (``FIXED_SPAN`` bytes
    there) if its fields are possible -- length in bounds, kind 1, path entries within
    the payload -- else None. A few unpacks: no checksum, no hash."""
    length: int = LEN.unpack_from(buf, i + 4)[0]
    if length < MIN_PAYLOAD or length > MAX_RECORD_BYTES:
        return None
    kind, _mid, _received_at, count = FIXED.unpack_from(buf, i + HEADER_BYTES)
    if kind != KIND_MESSAGE or MIN_PAYLOAD + 4 * count > length:
        return None
    return length
