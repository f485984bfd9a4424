"""Append-only output buffers that many readers can follow, kept on disk.

A sandbox's stdout is read by whoever asks: the handle that created it, a
handle from ``Sandbox.from_id`` after exit, a second reader that starts at
offset 0. So the server keeps the whole stream and every reader follows it by
byte offset (V1 logs name the offset ``entry_id``). The stream lives in a file
under the sandbox's directory in the state directory, not in the server's
memory: a long-running server that runs thousands of chatty sandboxes must not
grow with their output. Memory holds only a recent window (`TAIL_BYTES`, so a
reader that keeps up never touches the disk) and output not yet written out;
the file is written in large pieces, not once per pipe read, since every
system call hands the GIL away and an embedded server shares it with its host.
A finished buffer closes its file; a small one (at most `SMALL_BYTES`, e.g.
``print(1)``) never has one.

Waiting uses an asyncio event that is swapped on every append, so a reader
wakes as soon as data or EOF arrives, without polling.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

MAX_CHUNK = 1 << 20  # bytes per message sent to a client
MAX_LINES = 64  # lines per message (see `chunk_end`)
COALESCE_BYTES = 64 * 1024  # while output is flowing, let a message collect this much ...
COALESCE_S = 0.005  # ... or wait this long: each message costs the client ~1 ms
TAIL_BYTES = 64 * 1024  # recent output kept in memory while a stream runs
SMALL_BYTES = 4096  # a finished stream up to this size stays in memory, with no file


class OutputGone(Exception):
    """The buffer's file was removed (its sandbox was pruned) while it was being read."""


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
    """The output of one file descriptor: a file on disk, a recent window in memory, EOF.

    ``path`` is where the stream is kept once it outgrows memory; without one
    (small, server-made streams) everything stays in memory. Bytes
    ``[0, _written)`` are in the file, ``[_mem_start, _size)`` in ``_mem``,
    and ``_mem_start <= _written`` unless there is no file yet.
    """

    def __init__(
        self, path: Path | None = None, *, tail_bytes: int = TAIL_BYTES, window: int | None = None
    ) -> None:
        self.path = path
        #: bytes a reader can still get (`window_start`): Modal's output window, for a
        #: sandbox's stdout/stderr (`local.limits.DEFAULT_OUTPUT_WINDOW`); None: all
        self.window = window
        self.closed = False
        self.gone = False
        self._tail_bytes = tail_bytes
        self._mem = bytearray()
        self._mem_start = 0
        self._size = 0
        self._written = 0
        self._fd: int | None = None  # open (read-write) while the stream runs
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    @property
    def on_disk(self) -> bool:
        """True once part of the stream lives in its file."""
        return self._written > 0

    def window_start(self) -> int:
        """The first offset a reader can still get: output before it is dropped, as
        Modal drops it (a V2 reader hears a ``starting_offset`` past its own offset and
        warns "dropped first N bytes", modal/io_streams.py)."""
        if not self.window:
            return 0
        start = max(0, self._size - self.window)
        if start == 0:
            return 0
        try:  # not inside a UTF-8 character: the V2 text reader decodes strictly
            head = self.read(start, 4)
        except OutputGone:
            return start
        skip = 0
        while skip < len(head) - 1 and skip < 3 and (head[skip] & 0xC0) == 0x80:
            skip += 1
        return start + skip

    def memory_bytes(self) -> int:
        """Bytes this buffer holds in memory (for tests and the benchmark's accounting)."""
        return len(self._mem)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, chunk: bytes) -> None:
        if not chunk or self.closed:
            return
        self._mem.extend(chunk)
        self._size += len(chunk)
        if self.path is not None and self._size - self._written >= self._tail_bytes:
            try:
                self._write_out()
            except OSError:
                pass  # the disk is full or gone: memory keeps it, the next append retries
        self._notify()

    def _write_out(self) -> None:
        """Write what only memory holds to the file, then keep just the recent window."""
        assert self.path is not None
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(self._mem)[self._written - self._mem_start :]
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        finally:
            view.release()
        self._written = self._size
        keep_from = self._size - self._tail_bytes
        if keep_from - self._mem_start > self._tail_bytes:  # trim in large steps (memmove)
            del self._mem[: keep_from - self._mem_start]
            self._mem_start = keep_from

    def close(self) -> None:
        """EOF: no more appends. A stream bigger than `SMALL_BYTES` ends up whole in its
        file, which is closed, and the memory window is dropped."""
        if self.closed:
            return
        self.closed = True
        if self.path is not None and (self._written or self._size > SMALL_BYTES):
            try:
                if self._written < self._size:
                    self._write_out()
            except OSError:
                pass  # the disk is full or gone: keep serving what memory holds
            else:
                self._mem = bytearray()
                self._mem_start = self._size
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._notify()

    def discard(self) -> None:
        """Forget the stream (its sandbox is pruned; the caller removes the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.closed = self.gone = True
        self._mem = bytearray()
        self._mem_start = self._size
        self._notify()

    def read(self, offset: int, limit: int) -> bytes:
        """Bytes ``[offset, offset + limit)`` of the stream, or fewer at its end.

        Raises `OutputGone` if the file was pruned away.
        """
        offset = max(0, offset)
        end = min(self._size, offset + limit)
        if end <= offset:
            return b""
        if offset >= self._mem_start:
            return bytes(self._mem[offset - self._mem_start : end - self._mem_start])
        if self.gone or self.path is None:
            raise OutputGone(f"output at offset {offset} is no longer kept")
        disk_end = min(end, self._written)
        try:
            if self._fd is not None:
                data = os.pread(self._fd, disk_end - offset, offset)
            else:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    data = os.pread(fd, disk_end - offset, offset)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            raise OutputGone(f"output file {self.path} was removed") from None
        if end > disk_end:  # the rest is still only in memory
            data += self._mem[disk_end - self._mem_start : end - self._mem_start]
        return data

    def chunk(self, offset: int, max_chunk: int = MAX_CHUNK) -> bytes:
        """The next message from ``offset`` (see `chunk_end`); empty if nothing is there."""
        window = self.read(offset, max_chunk + 1)  # one byte more: is the message cut early?
        return window[: chunk_end(window, 0, max_chunk)]

    async def wait_for_more(self, offset: int, timeout: float | None = None) -> bool:
        """Wait until there is data past ``offset`` or EOF; False on timeout."""
        while self._size <= offset and not self.closed:
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
        while self._size < size and not self.closed:
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
        """Yield ``(start_offset, data)`` from ``offset`` until EOF; never an empty chunk.

        Ends early (as at EOF) if the stream is pruned away meanwhile. With a
        `window`, a reader behind it skips to its start: the chunk's start offset is
        then past the reader's, which is how Modal tells it output was dropped.
        """
        offset = max(0, offset)
        while True:
            await self.wait_for_more(offset)
            if not self.closed and self._size - offset < COALESCE_BYTES:
                await self.wait_for_size(offset + COALESCE_BYTES, COALESCE_S)
            offset = max(offset, self.window_start())  # older output is dropped
            if self._size > offset:
                try:
                    chunk = self.chunk(offset, max_chunk)
                except OutputGone:
                    return
                yield offset, chunk
                offset += len(chunk)
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
