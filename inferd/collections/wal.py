"""Write-ahead log: append-only records, each fsync'd before the caller acknowledges the write.

Record framing (little-endian):

    u32 payload_len | u32 crc32(payload) | payload (payload_len bytes)

`append` writes one record and fsyncs the file before it returns, so a record that `append` returned for is on
disk whatever happens to the process next (`kill -9`, power loss on honest hardware). A crash during `append`
leaves at most one incomplete record at the end of the file: `replay` recognises it (too short for its
header or its stated length, or a checksum mismatch on the last record), drops it, and truncates the file back
to the end of the last whole record so later appends follow valid data. A bad record with whole records after
it is not a torn write but corruption: `replay` raises `CorruptLogError` rather than silently dropping the
acknowledged records that follow it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("inferd.collections")

_HEADER = struct.Struct("<II")
HEADER_BYTES = _HEADER.size
# A record longer than this is treated as a damaged length field (a batch of 10k x 4096-d float32 is 160 MiB).
MAX_RECORD_BYTES = 1 << 30


class CorruptLogError(RuntimeError):
    """A record in the middle of the log fails its checksum: the log was damaged after it was written."""


def encode_record(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def fsync_dir(path: Path) -> None:
    """Make a rename/create/unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None
        self.num_bytes = 0
        self.num_records = 0

    def replay(self) -> Iterator[bytes]:
        """Yield every whole record's payload in order; drop (and truncate away) a torn tail.

        Must be consumed fully before `open_for_append`.
        """
        if not self.path.exists():
            self.num_bytes = 0
            return
        data = self.path.read_bytes()
        size = len(data)
        offset = 0
        num_records = 0
        while offset < size:
            torn_reason = None
            if size - offset < HEADER_BYTES:
                torn_reason = f"{size - offset} bytes, shorter than a record header"
            else:
                payload_len, crc = _HEADER.unpack_from(data, offset)
                end = offset + HEADER_BYTES + payload_len
                if payload_len > MAX_RECORD_BYTES or end > size:
                    torn_reason = f"header says {payload_len} payload bytes, {size - offset - HEADER_BYTES} remain"
                else:
                    payload = data[offset + HEADER_BYTES:end]
                    if zlib.crc32(payload) != crc:
                        if end < size:
                            raise CorruptLogError(
                                f"{self.path}: record {num_records} at byte {offset} fails its checksum and "
                                f"{size - end} bytes of later records follow it; refusing to drop them silently"
                            )
                        torn_reason = "checksum mismatch on the last record"
            if torn_reason is not None:
                logger.warning("%s: dropping a torn last record at byte %d (%s)", self.path, offset, torn_reason)
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                    f.flush()
                    os.fsync(f.fileno())
                break
            yield payload
            num_records += 1
            offset = end
        self.num_bytes = offset
        self.num_records = num_records

    def open_for_append(self) -> None:
        new = not self.path.exists()
        self._file = open(self.path, "ab")
        if new:
            fsync_dir(self.path.parent)
        self.num_bytes = self._file.tell()

    def append(self, payload: bytes) -> None:
        """Write one record and fsync it; on any failure the file is cut back to its previous end."""
        assert self._file is not None, "open_for_append first"
        record = encode_record(payload)
        start = self.num_bytes
        try:
            self._file.write(record)
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            try:
                self._file.truncate(start)
                self._file.seek(start)
            except OSError:
                pass
            raise
        self.num_bytes = start + len(record)
        self.num_records += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
