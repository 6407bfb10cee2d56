"""The wire between the gateway's process and its proxy workers.

Two socket pairs per worker, made by the gateway before it starts the worker (inherited file
descriptors: no name on disk, nothing else can connect to them):

- the control pair (SOCK_STREAM): length-prefixed pickled tuples both ways. Pickle, because
  both ends are the same program and nobody else can write on the pair; it is also the
  cheapest encoding for the small tuples sent per request. Messages written in one turn of
  the event loop go out in one write.
- the hand-over pair (SOCK_SEQPACKET): a client connection the worker will not serve (a GET,
  an admin route, an adapter...) goes to the gateway's process as its file descriptor
  (SCM_RIGHTS) with the bytes the worker had read from it, so the gateway's web layer serves
  it with the client's own socket and address.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct("!I")
# A hand-over message carries at most this many bytes (the rest follow in more messages).
HANDOVER_CHUNK = 32 * 1024
_HANDOVER_HEAD = struct.Struct("!Q")  # how many bytes the worker had read


class Wire(asyncio.Protocol):
    """One end of the control pair: `send` queues a message; `on_message` gets each one."""

    def __init__(
        self, on_message: Callable[[Any], None], on_lost: Callable[[], None] | None = None
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        while size - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            end = start + 4 + length
            if end > size:
                break
            message = pickle.loads(buffer[start + 4 : end])
            start = end
            self.on_message(message)
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_lost is not None:
            self.on_lost()

    def send(self, message: Any) -> None:
        if self.closed or self.transport is None:
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self._outgoing:
            assert self._loop is not None
            self._loop.call_soon(self._flush)
        self._outgoing += (_LENGTH.pack(len(data)), data)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.closed:
            self.transport.write(b"".join(outgoing))

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()


async def open_wire(
    sock: socket.socket, on_message: Callable[[Any], None], on_lost: Callable[[], None] | None
) -> Wire:
    loop = asyncio.get_running_loop()
    _transport, wire = await loop.connect_accepted_socket(lambda: Wire(on_message, on_lost), sock)
    return wire


def send_connection(sock: socket.socket, connection_fd: int, data: bytes) -> None:
    """Send a client connection (its descriptor) and the bytes read from it. Blocking: the
    caller runs it in a thread, one hand-over at a time per pair."""
    first = data[:HANDOVER_CHUNK]
    sock.sendmsg(
        [_HANDOVER_HEAD.pack(len(data)), first],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [connection_fd]))],
    )
    for offset in range(HANDOVER_CHUNK, len(data), HANDOVER_CHUNK):
        sock.sendall(data[offset : offset + HANDOVER_CHUNK])


class ConnectionReceiver:
    """The gateway's end of a hand-over pair: calls `on_connection(sock, data)` for each
    connection a worker hands over, once all its bytes are in."""

    def __init__(
        self, sock: socket.socket, on_connection: Callable[[socket.socket, bytes], None]
    ) -> None:
        self.sock = sock
        self.on_connection = on_connection
        self._pending: tuple[socket.socket, int, list[bytes]] | None = None
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                # MSG_CMSG_CLOEXEC: a received descriptor is not close-on-exec otherwise, and
                # an engine started while it is open would inherit the client's connection
                # (uvloop's spawn leaves inheritable descriptors open): the client would
                # never see it close.
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, _HANDOVER_HEAD.size + HANDOVER_CHUNK, 1, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data and not fds:
                self.close()  # the worker is gone
                return
            self._take(data, fds)

    def _take(self, data: bytes, fds: list[int]) -> None:
        for fd in fds:
            os.set_inheritable(fd, False)  # as above, where the flag is not honoured
        if fds:
            (total,) = _HANDOVER_HEAD.unpack_from(data)
            connection = socket.socket(fileno=fds[0])
            for extra in fds[1:]:  # never sent; closed rather than leaked
                socket.socket(fileno=extra).close()
            if self._pending is not None:  # a hand-over cut short: drop its connection
                self._pending[0].close()
            self._pending = (connection, total, [data[_HANDOVER_HEAD.size :]])
        elif self._pending is not None:
            self._pending[2].append(data)
        else:
            return
        connection, total, pieces = self._pending
        if sum(len(piece) for piece in pieces) >= total:
            self._pending = None
            self.on_connection(connection, b"".join(pieces))

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):  # no loop, or already closed
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        if self._pending is not None:
            self._pending[0].close()
            self._pending = None
        self.sock.close()
