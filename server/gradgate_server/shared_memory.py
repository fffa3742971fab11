"""Shared memory for a CallStream whose client runs on this host (gradient_service.proto,
SharedRegion): calls and answers are copied through a region both processes map,
instead of crossing gRPC's framing and the loopback socket (0.6-1 ms a megabyte here,
against 15-75 µs for a copy).

The server owns each region: an anonymous file (memfd) sealed at its size, so that no
client can shrink it under the server (whose next read would die of SIGBUS). A client
maps it through /proc/<pid>/fd/<fd>, which only a process of the same user, host and PID
namespace may open, and checks the token at its start to be sure it found this one. The
server copies each call out of the region before decoding it: a client that writes to
the region meanwhile changes nothing but the bytes of its own request.

Two pipes can stand in for the stream's messages too (``Pipes``): a message through gRPC
passes between several of its threads on both sides (~0.2 ms each way here), a word
through a pipe wakes the one thread waiting for it (~0.04 ms).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import select
from collections.abc import Callable, Iterator

from gradgate.shared_memory import NAME, TOKEN_BYTES, WORD_BYTES
from gradgate.v1 import gradient_service_pb2 as pb

from .engine import InvalidArgument
from .metrics import Metrics

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


class Pipes:
    """The pipes of a signalled CallStream: the client writes each call's length into one,
    the server each answer's into the other, as 8-byte integers (0: on the stream instead).
    Until the client says it has opened its ends (``handed_over``), the server holds them
    too; afterwards the end of a pipe means the other side is gone."""

    def __init__(self) -> None:
        self.calls, self.client_calls = os.pipe2(os.O_CLOEXEC)
        self.client_answers, self.answers = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.answers, False)  # a client that reads no answers cannot hold this thread
        self._poll = select.poll()  # not select(): it refuses descriptors of 1024 and more
        self._poll.register(self.calls, select.POLLIN)

    def handed_over(self) -> None:
        for fd in (self.client_calls, self.client_answers):
            if fd >= 0:
                os.close(fd)
        self.client_calls = self.client_answers = -1

    def next(self, alive: Callable[[], bool]) -> int | None:
        """The next call's length (0: on the stream), waiting while ``alive()`` (asked every
        0.25 s); None once the call is over, or the client has closed its pipe."""
        while not self._poll.poll(250):
            if not alive():
                return None
        word = os.read(self.calls, WORD_BYTES)
        if 0 < len(word) < WORD_BYTES:
            raise InvalidArgument(f"{len(word)} bytes on the call pipe: write each length as {WORD_BYTES} bytes "
                                  "at once", "call_pipe")
        return int.from_bytes(word, "little") if word else None

    def signal(self, length: int) -> None:
        try:
            os.write(self.answers, length.to_bytes(WORD_BYTES, "little"))
        except BrokenPipeError:  # the client is gone: the call pipe's end says so next
            pass
        except BlockingIOError:  # thousands of answers unread: this client is not following the protocol
            raise InvalidArgument("the answer pipe is full: read each answer before the next call",
                                  "answer_pipe") from None

    def close(self) -> None:
        self.handed_over()
        os.close(self.calls)
        os.close(self.answers)


class Lane:
    """A CallStream's use of shared memory: the region (and pipes) its client asked for, if any.
    ``allowed``: this server offers regions (--shared-memory) and the client is local."""

    def __init__(self, allowed: bool, max_bytes: int, metrics: Metrics):
        self.allowed, self.max_bytes, self.metrics = allowed and supported(), max_bytes, metrics
        self.region: Region | None = None
        self.pipes: Pipes | None = None
        self.signalled = False  # calls and answers go through the pipes
        self.unread = False  # an answer is in the region, and the client has sent nothing since

    def open(self, request: pb.SharedRegionRequest) -> bytes:
        """The StreamAnswer to an open_region: a region of the size asked for, or as big as
        the message limit allows, in place of a smaller one (a region never shrinks: the
        stream's own stays when it is as big), with pipes if asked; size 0 when this server
        lends none."""
        size = min(max(request.size, MIN_BYTES), self.max_bytes)
        none = pb.StreamAnswer(region=pb.SharedRegion()).SerializeToString()
        if not (self.allowed and request.size and size >= MIN_BYTES):
            self.close()
            return none
        try:
            if self.region is None or size > self.region.size:
                self._drop_region()
                self.region = Region(size)
                self.metrics.shared_memory_bytes.inc(size)
            if request.signal and self.pipes is None:
                self.pipes = Pipes()
        except OSError:  # out of file descriptors or memory: the stream carries on without
            self.close()
            return none
        described = self.region.described()
        if self.pipes is not None and self.pipes.client_calls >= 0:
            described.call_pipe, described.answer_pipe = self.pipes.client_calls, self.pipes.client_answers
        return pb.StreamAnswer(region=described).SerializeToString()

    def next_call(self, datas: Iterator[bytes], alive: Callable[[], bool]) -> bytes | None:
        """The stream's next message (None at its end): from the stream itself, or, signalled,
        an in_region for the call whose length came through the pipe."""
        if not self.signalled:
            return next(datas, None)
        assert self.pipes is not None
        length = self.pipes.next(alive)
        if not length:
            return None if length is None else next(datas, None)
        return pb.StreamCall(in_region=pb.InRegion(length=length)).SerializeToString()

    def read(self, marker: pb.InRegion) -> bytes:
        if self.region is None:
            raise InvalidArgument("in_region without a region: send open_region first", "in_region")
        if marker.signal and not self.signalled:
            if self.pipes is None or self.pipes.client_calls < 0:
                raise InvalidArgument("in_region.signal without pipes: ask for them with open_region.signal",
                                      "in_region.signal")
            self.pipes.handed_over()
            self.signalled = True
        data = self.region.read(marker.length)
        self.metrics.shared_memory_calls.inc()
        return data

    def answer(self, data: bytes, shared: bool) -> bytes | None:
        """What to send on the stream for the answer ``data``: it, or (to a call that came
        through the region, when it fits) an in_region for it written there, or nothing once
        signalled through the pipe."""
        pipes = self.pipes if self.signalled else None
        if shared and self.region is not None and len(data) <= self.region.size:
            self.region.write(data)
            self.unread = True
            if pipes is not None:
                pipes.signal(len(data))
                return None
            return pb.StreamAnswer(in_region=pb.InRegion(length=len(data))).SerializeToString()
        if pipes is not None:
            pipes.signal(0)
        return data

    def _drop_region(self) -> None:
        if self.region is not None:
            self.region.close(free=not self.unread)
            self.metrics.shared_memory_bytes.dec(self.region.size)
            self.region = None

    def close(self) -> None:
        self._drop_region()
        if self.pipes is not None:
            self.pipes.close()
            self.pipes, self.signalled = None, False
