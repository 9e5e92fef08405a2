"""A minimal terminal screen for the live-view tests: what a ``rows`` x ``columns`` terminal
shows after receiving a byte stream (printable text with xterm's automatic wrap at the last
column, carriage return, line feed with scrolling and the tty's carriage return, and the CSI
sequences a redrawing view sends: cursor up/down/column, erase in line/display; colours and
modes are ignored).

A test reads the rows a user would see, so a line longer than the terminal is checked as
the two rows it becomes, not as the one line the program wrote. ``run_on_terminal`` runs a
command on a pseudo-terminal and returns what it wrote.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

CSI = re.compile(r"\x1b\[([?0-9;]*)([@-~])|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


class Screen:
    def __init__(self, rows: int, columns: int):
        self.height, self.width = rows, columns
        self.grid = [[" "] * columns for _ in range(rows)]
        self.row = self.column = 0
        self.wrap_pending = False  # xterm: the last column was written, wrap on the next char
        self.scrolled: list[str] = []  # rows that scrolled off the top, oldest first

    def feed(self, text: str) -> None:
        position = 0
        for match in CSI.finditer(text):
            self._text(text[position:match.start()])
            if match.group(2):
                self._csi(match.group(1), match.group(2))
            position = match.end()
        self._text(text[position:])

    @property
    def rows(self) -> list[str]:
        return ["".join(row).rstrip() for row in self.grid]

    def _text(self, text: str) -> None:
        for char in text:
            if char == "\r":
                self.column, self.wrap_pending = 0, False
            elif char == "\n":  # the tty's default ONLCR: a line feed returns the carriage
                self._line_feed()
                self.column, self.wrap_pending = 0, False
            elif char == "\b":
                self.column, self.wrap_pending = max(0, self.column - 1), False
            elif char >= " ":
                if self.wrap_pending:
                    self.column = 0
                    self._line_feed()
                    self.wrap_pending = False
                self.grid[self.row][self.column] = char
                if self.column == self.width - 1:
                    self.wrap_pending = True
                else:
                    self.column += 1

    def _line_feed(self) -> None:
        if self.row == self.height - 1:
            self.scrolled.append("".join(self.grid.pop(0)).rstrip())
            self.grid.append([" "] * self.width)
        else:
            self.row += 1

    def _csi(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return  # modes (cursor visibility): nothing on the screen changes
        numbers = [int(p) if p else 0 for p in params.split(";")] if params else []
        n = numbers[0] if numbers else 0
        self.wrap_pending = False
        if final == "A":
            self.row = max(0, self.row - max(n, 1))
        elif final == "B":
            self.row = min(self.height - 1, self.row + max(n, 1))
        elif final == "G":
            self.column = min(self.width - 1, max(n, 1) - 1)
        elif final == "H":
            self.row = min(self.height - 1, max(n, 1) - 1)
            self.column = min(self.width - 1, max(numbers[1] if len(numbers) > 1 else 1, 1) - 1)
        elif final == "K":
            start, end = {0: (self.column, self.width), 1: (0, self.column + 1),
                          2: (0, self.width)}[n]
            self.grid[self.row][start:end] = [" "] * (end - start)
        elif final == "J":
            rows = {0: range(self.row + 1, self.height), 1: range(0, self.row),
                    2: range(self.height)}.get(n, range(0))
            for r in rows:
                self.grid[r] = [" "] * self.width
            if n == 0:
                self.grid[self.row][self.column:] = [" "] * (self.width - self.column)


def run_on_terminal(command: list[str], env: dict, timeout: float,
                    columns: int | None = None, stderr=None) -> str:
    """All that ``command`` writes to a pseudo-terminal (``columns`` wide where given, as a
    user's window is: TIOCSWINSZ), read until it exits (killed, and the test failed, past
    ``timeout`` seconds). ``stderr``: where standard error goes instead of the terminal (a
    file), to read standard output alone."""
    master, slave = os.openpty()
    if columns:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(command, stdin=slave, stdout=slave,
                               stderr=slave if stderr is None else stderr, env=env, close_fds=True)
    os.close(slave)
    raw, deadline = b"", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"{command} ran past {timeout} s: {raw[-2000:]!r}"
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        assert process.wait(timeout=30) == 0, raw[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        os.close(master)
    return raw.decode("utf-8", "replace")
