"""A fault-injecting TCP proxy between real workers and a real database server, for tests.

It listens on a free 127.0.0.1 port and forwards every connection to the server. The test
switches its mode while workers run:

- `passing()`: forward everything;
- `reset()`: reset (RST) every open connection, then pass;
- `random_resets(rate)`: forward, but reset a connection at a client chunk with probability
  `rate` (seeded), before it reaches the server: no answer is lost after a commit;
- `reset_on(*needles)`: reset the connection once a transaction's client bytes contain every
  needle, before they reach the server (the statement is never run);
- `lose_answer(*needles)`: once a transaction's client bytes contain every needle, forward its
  COMMIT, drop the server's reply and reset the client (the answer lost after the commit).
  These two queue one-shot rules, applied in order, beside any mode;
- `hold(*needles)`: hold the chunk that completes the needles (a delayed packet) until
  `release()`;
- `blackhole()`: hold every byte and answer nothing, close nothing (a silent partition); new
  connections are accepted and get no answer;
- `refuse()`: refuse new connections (the listener is closed), reset open ones;
- `trickle(chunk, pause_s)`: forward, but hand the server's bytes on at `chunk` bytes per
  `pause_s` (a slow link: a large answer streams in slowly, never silent longer than that).

With `redis=True` the server speaks Redis (RESP): each command is its own transaction and
its reply is its answer, so a rule applies to the first command (an array of bulk strings)
whose bytes contain every needle: `reset_on` resets before it reaches the server,
`lose_answer` forwards it (the server applies it) and drops its reply.

Everything runs on one event loop in a daemon thread; the methods are safe to call from the
test's thread. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass, field

from servers import free_port

CHUNK = 65536
# The client's message that ends a transaction (PostgreSQL's simple query "COMMIT", MySQL's
# COM_QUERY "COMMIT"): its reply is the answer to the whole transaction.
COMMIT = b"COMMIT"
ROLLBACK = b"ROLLBACK"


@dataclass(eq=False)  # links are told apart by identity, in a set
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    sent: bytearray = field(default_factory=bytearray)  # client bytes of this transaction
    cut_next_answer: bool = False
    hold_this_chunk: bool = False


@dataclass(frozen=True)
class _Rule:
    lose_answer: bool  # else: reset before the statement reaches the server
    needles: tuple[bytes, ...]
    hold: bool = False  # hold the chunk until release()


class FaultProxy:
    def __init__(self, server_port: int, seed: int = 0, redis: bool = False):
        self.server_port = server_port
        self.redis = redis
        self.random = random.Random(seed)
        self.answers_lost = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._listener: asyncio.AbstractServer | None = None
        self._mode = "pass"
        self._rate = 0.0
        self._trickle = (CHUNK, 0.0)  # bytes, seconds
        self.rules: list[_Rule] = []  # pending, first one first
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._released = asyncio.Event()
        self.holding = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._do(self._set_flowing, True)
        self._do(self._listen)

    # The test's controls.
    def passing(self) -> None:
        self._do(self._switch, "pass", True)

    def reset(self) -> None:
        self._do(self._reset_all)
        self.passing()

    def random_resets(self, rate: float) -> None:
        self._rate = rate
        self._do(self._switch, "random", True)

    def reset_on(self, *needles: bytes) -> None:
        self._do(self.rules.append, _Rule(False, needles))

    def lose_answer(self, *needles: bytes) -> None:
        self._do(self.rules.append, _Rule(True, needles))

    def hold(self, *needles: bytes) -> None:
        """Hold the client's chunk that completes the needles (a network that delays it) until
        release(); `holding` is set once it is held."""
        self._do(self.rules.append, _Rule(False, needles, hold=True))

    def release(self) -> None:
        self._do(self._released.set)

    def blackhole(self) -> None:
        self._do(self._switch, "blackhole", False)

    def refuse(self) -> None:
        self._do(self._refuse)

    def trickle(self, chunk: int, pause_s: float) -> None:
        self._trickle = (chunk, pause_s)
        self._do(self._switch, "trickle", True)

    def close(self) -> None:
        self._do(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # On the loop.
    def _do(self, function, *args) -> None:  # noqa: ANN001
        async def run() -> None:
            result = function(*args)
            if asyncio.iscoroutine(result):
                await result

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def _set_flowing(self, flowing: bool) -> None:
        (self._flowing.set if flowing else self._flowing.clear)()

    async def _switch(self, mode: str, flowing: bool) -> None:
        self._mode = mode
        self._set_flowing(flowing)
        if self._listener is None:
            await self._listen()

    async def _listen(self) -> None:
        self._listener = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _refuse(self) -> None:
        self._mode = "refuse"
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._reset_all()

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        self._reset_all()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _reset_all(self) -> None:
        for link in list(self._links):
            self._kill(link)

    def _kill(self, link: _Link) -> None:
        """Close both sides with RST (SO_LINGER 0), as a crashed host or a middlebox does."""
        if link not in self._links:
            return
        self.resets += 1
        self._links.discard(link)
        for writer in (link.client, link.server):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def _accept(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # the proxy closes
            await self._forward(_Link(client), client_in)

    async def _forward(self, link: _Link, client_in: asyncio.StreamReader) -> None:
        self._links.add(link)
        await self._flowing.wait()  # a blackhole answers no new connection either
        try:
            server_in, link.server = await asyncio.open_connection("127.0.0.1", self.server_port)
        except OSError:
            self._kill(link)
            return
        if link not in self._links:  # reset meanwhile
            self._kill(link)
            return
        await asyncio.gather(
            self._pump(link, client_in, link.server, upstream=True),
            self._pump(link, server_in, link.client, upstream=False),
        )

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        upstream: bool,
    ) -> None:
        while link in self._links:
            try:
                data = await source.read(CHUNK)
            except OSError:
                data = b""
            await self._flowing.wait()  # held, not dropped, while the network is silent
            if not data:  # a side closed: close the other one, without a fault
                self._links.discard(link)
                target.close()
                return
            if upstream and self._resets_here(link, data):
                break
            if upstream and link.hold_this_chunk:
                link.hold_this_chunk = False
                await self._released.wait()
            if not upstream and link.cut_next_answer:
                self.answers_lost += 1
                break
            if not upstream and self._mode == "trickle":
                data = await self._trickled(target, data)
            target.write(data)
            try:
                await target.drain()
            except OSError:
                break
        self._kill(link)

    async def _trickled(self, target: asyncio.StreamWriter, data: bytes) -> bytes:
        """Sends all but the last piece of `data` at the trickle's rate; returns the last."""
        chunk, pause_s = self._trickle
        while True:
            piece, data = data[:chunk], data[chunk:]
            await asyncio.sleep(pause_s * len(piece) / chunk)
            if not data:
                return piece
            target.write(piece)
            with contextlib.suppress(OSError):
                await target.drain()

    def _resets_here(self, link: _Link, data: bytes) -> bool:
        """Whether a client chunk resets its connection; arms a lost answer on its way."""
        if self._mode == "random" and self.random.random() < self._rate:
            return True
        link.sent += data
        if self.redis:
            return self._redis_resets_here(link)
        rule = self.rules[0] if self.rules else None
        ends = COMMIT in data or ROLLBACK in data
        if rule is not None and all(needle in link.sent for needle in rule.needles):
            if rule.hold:
                self.rules.pop(0)
                link.hold_this_chunk = True
                self.holding.set()
            elif not rule.lose_answer:
                self.rules.pop(0)
                return True
            elif COMMIT in data:
                self.rules.pop(0)
                link.cut_next_answer = True
        if ends:
            link.sent.clear()
        return False

    def _redis_resets_here(self, link: _Link) -> bool:
        """The rules on the Redis commands the client's bytes complete."""
        commands, rest = redis_commands(bytes(link.sent))
        link.sent[:] = rest
        for command in commands:
            rule = self.rules[0] if self.rules else None
            if rule is None or not all(needle in command for needle in rule.needles):
                continue
            self.rules.pop(0)
            if rule.hold:
                link.hold_this_chunk = True
                self.holding.set()
            elif not rule.lose_answer:
                return True
            else:
                link.cut_next_answer = True
        return False


def redis_commands(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete RESP commands at the start of `buffer`, and the bytes after them.

    A client sends each command as an array of bulk strings: `*<n>\\r\\n`, then n times
    `$<length>\\r\\n<bytes>\\r\\n` (redis-py sends nothing else)."""
    commands, start = [], 0
    while (end := _redis_command_end(buffer, start)) is not None:
        commands.append(buffer[start:end])
        start = end
    return commands, buffer[start:]


def _redis_command_end(buffer: bytes, at: int) -> int | None:
    line = buffer.find(b"\r\n", at)
    if line < 0 or buffer[at : at + 1] != b"*":
        return None
    count, at = int(buffer[at + 1 : line]), line + 2
    for _ in range(count):
        line = buffer.find(b"\r\n", at)
        if line < 0:
            return None
        at = line + 2 + int(buffer[at + 1 : line]) + 2  # "$<length>", the bytes, CRLF
        if at > len(buffer):
            return None
    return at
