"""Shared memory for a CallStream whose client runs on this host (gradient_service.proto,
SharedRegion): big calls and answers are copied through a region both processes map,
instead of crossing gRPC's framing and the loopback socket (0.6-1 ms a megabyte here,
against 15-75 µs for a copy).

The server owns each region: an anonymous file (memfd) sealed at its size, so that no
client can shrink it under the server (whose next read would die of SIGBUS). A client
maps it through /proc/<pid>/fd/<fd>, which only a process of the same user, host and PID
namespace may open, and checks the token at its start to be sure it found this one. The
server copies each call out of the region before decoding it: a client that writes to
the region meanwhile changes nothing but the bytes of its own request.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import secrets

from gradgate.v1 import gradient_service_pb2 as pb

from .engine import InvalidArgument
from .metrics import Metrics

TOKEN_BYTES = 16
NAME = "gradgate-call-stream"  # the memfd's name: /proc/<pid>/fd/<fd> links to "/memfd:<NAME> (deleted)"
MIN_BYTES = 2**20  # a region is never smaller: below that the stream's own message is as fast
# peers that may be on this host; anyone else is refused at once (it could not map the region)
_LOCAL = ("ipv4:127.", "ipv6:%5B::1%5D", "ipv6:%5B::ffff:127.", "ipv6:[::1]", "ipv6:[::ffff:127.", "unix:")


def supported() -> bool:
    """Whether this platform has sealed memfds and /proc (Linux)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") and os.path.isdir("/proc/self/fd")


def local(peer: str) -> bool:
    """Whether a gRPC peer string (``context.peer()``) is a loopback or unix-socket client."""
    return peer.startswith(_LOCAL)


class Region:
    """One CallStream's region, of ``size`` bytes."""

    def __init__(self, size: int):
        fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.size, self.token = fd, size, secrets.token_bytes(TOKEN_BYTES)
        self._map[:TOKEN_BYTES] = self.token

    def described(self) -> pb.SharedRegion:
        return pb.SharedRegion(size=self.size, pid=os.getpid(), fd=self.fd, token=self.token)

    def read(self, length: int) -> bytes:
        """A copy of the message in the region's first ``length`` bytes."""
        if not 0 < length <= self.size:
            raise InvalidArgument(f"in_region.length must be in [1, {self.size}] (the region's size), got {length}",
                                  "in_region.length")
        return self._map[:length]

    def write(self, data: bytes) -> None:
        self._map[:len(data)] = data

    def close(self, free: bool = True) -> None:
        # Free the pages now (a client may still hold the file open, which would keep them),
        # unless the client may still read an answer there: then its mapping keeps them.
        if free and hasattr(mmap, "MADV_REMOVE"):
            try:
                self._map.madvise(mmap.MADV_REMOVE)
            except OSError:
                pass
        self._map.close()
        os.close(self.fd)


class Lane:
    """A CallStream's use of shared memory: the region its client asked for, if any.
    ``allowed``: this server offers regions (--shared-memory) and the client is local."""

    def __init__(self, allowed: bool, max_bytes: int, metrics: Metrics):
        self.allowed, self.max_bytes, self.metrics = allowed and supported(), max_bytes, metrics
        self.region: Region | None = None
        self.unread = False  # an answer is in the region, and the client has sent nothing since

    def open(self, request: pb.SharedRegionRequest) -> bytes:
        """The StreamAnswer to an open_region: a region of the size asked for, or as big as
        the message limit allows, in place of a smaller one (a region never shrinks: the
        stream's own stays when it is as big); size 0 when this server lends none."""
        size = min(max(request.size, MIN_BYTES), self.max_bytes)
        if not (self.allowed and request.size and size >= MIN_BYTES):
            self.close()
            return pb.StreamAnswer(region=pb.SharedRegion()).SerializeToString()
        if self.region is None or size > self.region.size:
            self.close()
            try:
                self.region = Region(size)
            except OSError:  # out of file descriptors or memory: the stream carries on without
                return pb.StreamAnswer(region=pb.SharedRegion()).SerializeToString()
            self.metrics.shared_memory_bytes.inc(size)
        return pb.StreamAnswer(region=self.region.described()).SerializeToString()

    def read(self, marker: pb.InRegion) -> bytes:
        if self.region is None:
            raise InvalidArgument("in_region without a region: send open_region first", "in_region")
        data = self.region.read(marker.length)
        self.metrics.shared_memory_calls.inc()
        return data

    def answer(self, data: bytes) -> bytes:
        """The answer to a call that came through the region: through the region too, if it fits."""
        if self.region is None or len(data) > self.region.size:
            return data
        self.region.write(data)
        self.unread = True
        return pb.StreamAnswer(in_region=pb.InRegion(length=len(data))).SerializeToString()

    def close(self) -> None:
        if self.region is not None:
            self.region.close(free=not self.unread)
            self.metrics.shared_memory_bytes.dec(self.region.size)
            self.region = None
