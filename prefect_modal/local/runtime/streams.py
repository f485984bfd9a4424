"""Append-only output buffers that many readers can follow.

A sandbox's stdout is read by whoever asks: the handle that created it, a
handle from ``Sandbox.from_id`` after exit, a second reader that starts at
offset 0. So the server keeps the whole stream (the emulation's main memory
cost; Modal keeps only a recent window) and every reader follows it by byte
offset. Waiting uses an asyncio event that is swapped on every append, so a
reader wakes as soon as data or EOF arrives, without polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

MAX_CHUNK = 1 << 20  # bytes per message sent to a client
MAX_LINES = 64  # lines per message (see `chunk_end`)
COALESCE_BYTES = 64 * 1024  # while output is flowing, let a message collect this much ...
COALESCE_S = 0.005  # ... or wait this long: each message costs the client ~1 ms


def chunk_end(
    data: bytes | bytearray, offset: int, max_chunk: int = MAX_CHUNK, max_lines: int = MAX_LINES
) -> int:
    """Where the message starting at ``offset`` should end.

    The modal client splits text output into lines with ``buf.split("\\n", 1)``
    per line, which copies the rest of the message each time: a message of C
    bytes holding K lines costs K*C/2 bytes of copying, so 1 MiB of short lines
    in one message takes seconds. Output without newlines wants the opposite
    (big messages, because the client rescans its unfinished line per message).
    So: at most ``max_lines`` lines per message, a message that is cut early
    ends on a line boundary, and newline-free output goes in ``max_chunk`` pieces.
    """
    size = len(data)
    end = min(size, offset + max_chunk)
    pos = offset
    last_nl = -1
    for _ in range(max_lines):
        i = data.find(b"\n", pos, end)
        if i < 0:
            break
        last_nl, pos = i, i + 1
    else:
        return pos
    if last_nl >= 0 and end < size:
        return last_nl + 1
    return end


class OutputBuffer:
    """The full output of one file descriptor, plus an EOF flag."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self.data)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        if chunk and not self.closed:
            self.data.extend(chunk)
            self._notify()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._notify()

    async def wait_for_more(self, offset: int, timeout: float | None = None) -> bool:
        """Wait until there is data past ``offset`` or EOF; False on timeout."""
        while len(self.data) <= offset and not self.closed:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def wait_for_size(self, size: int, timeout: float) -> None:
        """Wait until the buffer holds ``size`` bytes, is closed, or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.data) < size and not self.closed:
            left = end - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return

    async def follow(
        self, offset: int, max_chunk: int = MAX_CHUNK
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(start_offset, data)`` from ``offset`` until EOF; never an empty chunk."""
        offset = max(0, offset)
        while True:
            await self.wait_for_more(offset)
            if not self.closed and len(self.data) - offset < COALESCE_BYTES:
                await self.wait_for_size(offset + COALESCE_BYTES, COALESCE_S)
            if len(self.data) > offset:
                end = chunk_end(self.data, offset, max_chunk)
                chunk = bytes(self.data[offset:end])
                yield offset, chunk
                offset = end
                continue
            if self.closed:
                return


def utf8_safe_end(data: bytes | bytearray, start: int, end: int) -> int:
    """The largest cut <= ``end`` that does not split a UTF-8 sequence.

    V1 logs carry text (a protobuf string), so a chunk boundary inside a
    multibyte character would corrupt it. If the tail is not a valid sequence
    start at all, cut at ``end`` and let the decoder replace it.
    Returns ``start`` when the whole range is one incomplete character.
    """
    if end <= start:
        return end
    i = end - 1
    steps = 0
    while i >= start and steps < 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
        steps += 1
    if i < start:
        return end
    lead = data[i]
    if lead < 0x80:
        return end
    if lead >= 0xF0:
        need = 4
    elif lead >= 0xE0:
        need = 3
    elif lead >= 0xC0:
        need = 2
    else:
        return end
    if end - i >= need:
        return end
    return i  # may equal ``start``: the caller waits for more bytes or EOF
