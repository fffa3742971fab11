"""The client's side of a CallStream's shared-memory region (gradient_service.proto,
SharedRegion; the server's side: gradgate_server.shared_memory).

A server on this host, running as the same user, lends a CallStream a region of memory
and two pipes: the session's calls and answers are then copied through the region (15-75
µs a megabyte here, against 0.6-1 ms through gRPC's framing and the loopback socket) and
announced by their length through a pipe (a round trip of ~0.08 ms, against ~0.3-0.45 ms
for a message each way between gRPC's threads). Anything else (a server elsewhere, in
another container, older, or with --no-shared-memory) leaves the calls on the stream
itself, as before.
"""
from __future__ import annotations

import fcntl
import math
import mmap
import os
import select
import stat
import time
import weakref

from gradgate.codec import Pieces
from gradgate.v1 import gradient_service_pb2 as pb

SUPPORTED = os.path.isdir("/proc/self/fd") and hasattr(fcntl, "F_GET_SEALS")
# the protocol, the server's side too (gradgate_server.shared_memory)
NAME = "gradgate-call-stream"  # a region's memfd: /proc/<pid>/fd/<fd> links to "/memfd:<NAME> (deleted)"
TOKEN_BYTES = 16  # the random token at a region's start
WORD_BYTES = 8  # a length through a pipe, little-endian
_MEMFD = f"/memfd:{NAME}"
_SEALED = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)


class Region:
    """A mapped region: ``write`` a message into it, ``read`` one back (a copy)."""

    def __init__(self, memory: mmap.mmap):
        self._map, self.size = memory, len(memory)

    @classmethod
    def mapped(cls, described: pb.SharedRegion) -> Region | None:
        """Map the region the server described, or None unless it is one: a gradgate server's
        memfd, sealed at the described size, starting with the token. This process cannot map
        one if it is not on the server's host, as its user, in its PID namespace."""
        path = f"/proc/{described.pid}/fd/{described.fd}"
        if not described.size or len(described.token) != TOKEN_BYTES:
            return None
        try:
            if not os.readlink(path).startswith(_MEMFD):  # never open anything else
                return None
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            info = os.fstat(fd)
            if not (os.readlink(f"/proc/self/fd/{fd}").startswith(_MEMFD) and stat.S_ISREG(info.st_mode)
                    and info.st_size == described.size and fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALED == _SEALED):
                return None
            memory = mmap.mmap(fd, described.size)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if memory[:TOKEN_BYTES] != described.token:
            memory.close()
            return None
        return cls(memory)

    def write(self, call: Pieces, signal: bool = False) -> bytes:
        """Copy ``call`` (a StreamCall) into the region; returns the StreamCall that points at it."""
        call.write_to(self._map)
        return pb.StreamCall(in_region=pb.InRegion(length=call.nbytes, signal=signal)).SerializeToString()

    def read(self, length: int) -> bytes | None:
        """A copy of the answer in the region's first ``length`` bytes (None if out of range)."""
        return self._map[:length] if 0 < length <= self.size else None

    def close(self) -> None:
        self._map.close()


def size_for(message_bytes: int, limit: int) -> int:
    """The region to ask for, for messages of ``message_bytes``: room for twice that, in
    whole MiB, within the message limit."""
    return min(limit, max(2**20, -(-2 * message_bytes // 2**20) * 2**20))


ENDED = -1  # Pipes.wait: the server closed its end of the pipes


class Pipes:
    """The client's ends of a region's pipes: ``send`` a call's length (0: the call is on the
    stream), ``wait`` for an answer's."""

    def __init__(self, calls: int, answers: int):
        self.calls, self.answers = calls, answers
        self._poll = select.poll()  # not select(): it refuses descriptors of 1024 and more
        self._poll.register(answers, select.POLLIN)
        self._closed = weakref.finalize(self, _close, calls, answers)  # also when dropped unclosed

    @classmethod
    def opened(cls, described: pb.SharedRegion) -> Pipes | None:
        """The pipes the server lent with its region, or None (none lent, or not pipes)."""
        if not (described.call_pipe and described.answer_pipe):
            return None
        fds: list[int] = []
        try:
            for fd, mode in ((described.call_pipe, os.O_WRONLY), (described.answer_pipe, os.O_RDONLY)):
                path = f"/proc/{described.pid}/fd/{fd}"
                if not os.readlink(path).startswith("pipe:"):
                    raise OSError(f"{path} is not a pipe")
                fds.append(os.open(path, mode | os.O_CLOEXEC | os.O_NONBLOCK))
                if not stat.S_ISFIFO(os.fstat(fds[-1]).st_mode):
                    raise OSError(f"{path} is not a pipe")
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        return cls(*fds)

    def send(self, length: int) -> bool:
        """False if the server has closed its end (the stream is over)."""
        try:
            return os.write(self.calls, length.to_bytes(WORD_BYTES, "little")) == WORD_BYTES
        except OSError:  # BrokenPipeError, or a full pipe (a server not reading)
            return False

    def wait(self, deadline: float) -> int | None:
        """The answer's length (0: on the stream; ENDED: the server closed its end, so the
        stream is over), or None once ``deadline`` (time.monotonic) has passed."""
        while not self._poll.poll(max(0, math.ceil((deadline - time.monotonic()) * 1000))):
            if time.monotonic() >= deadline:
                return None
        try:
            word = os.read(self.answers, WORD_BYTES)
        except BlockingIOError:
            return 0
        if not word:
            return ENDED
        return int.from_bytes(word, "little") if len(word) == WORD_BYTES else 0

    def close(self) -> None:
        self._closed()


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
