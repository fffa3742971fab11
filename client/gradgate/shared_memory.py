"""The client's side of a CallStream's shared-memory region (gradient_service.proto,
SharedRegion; the server's side: gradgate_server.shared_memory).

A server on this host, running as the same user, lends a CallStream a region of memory;
the session's big calls and answers are then copied through it (a few microseconds a
megabyte) instead of crossing gRPC's framing and the loopback socket (about 1.5 GB/s).
Anything else (a server elsewhere, in another container, older, or with
--no-shared-memory) leaves the calls on the stream itself, as before.
"""
from __future__ import annotations

import mmap
import os

from gradgate.codec import Pieces
from gradgate.v1 import gradient_service_pb2 as pb

MIN_BYTES = 64 * 2**10  # a call or answer this big makes its stream ask for a region
SUPPORTED = os.path.isdir("/proc/self/fd")


class Region:
    """A mapped region: ``write`` a message into it, ``read`` one back (a copy)."""

    def __init__(self, memory: mmap.mmap):
        self._map, self.size = memory, len(memory)

    @classmethod
    def mapped(cls, described: pb.SharedRegion) -> Region | None:
        """Map the region the server described, or None if this process cannot (not on the
        server's host, as its user, in its PID namespace) or finds another one there."""
        if not described.size:
            return None
        try:
            fd = os.open(f"/proc/{described.pid}/fd/{described.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != described.size:
                return None
            memory = mmap.mmap(fd, described.size)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if memory[:len(described.token)] != described.token or not described.token:
            memory.close()
            return None
        return cls(memory)

    def write(self, call: Pieces) -> bytes:
        """Copy ``call`` (a StreamCall) into the region; returns the StreamCall that points at it."""
        call.write_to(self._map)
        return pb.StreamCall(in_region=pb.InRegion(length=call.nbytes)).SerializeToString()

    def read(self, length: int) -> bytes | None:
        """A copy of the answer in the region's first ``length`` bytes (None if out of range)."""
        return self._map[:length] if 0 < length <= self.size else None

    def close(self) -> None:
        self._map.close()


def size_for(message_bytes: int, limit: int) -> int:
    """The region to ask for, for messages of ``message_bytes``: room for twice that, in
    whole MiB, within the message limit."""
    return min(limit, max(2**20, -(-2 * message_bytes // 2**20) * 2**20))
