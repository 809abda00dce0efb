"""Reading a child process's output line by line with a deadline, so that a child that stays silent fails
the test instead of hanging the run (a plain `readline()` or `for line in pipe` waits for ever).

This module holds no tests.
"""
from __future__ import annotations

import os
import selectors
import time
from collections.abc import Callable
from typing import IO


def read_lines_until(pipe: IO, done: Callable[[str], bool], what: str, timeout: float) -> list[str]:
    """The lines read from `pipe` up to and including the first for which `done(line)` is true.

    Fails naming `what` and showing the output seen when that line has not come within `timeout`
    seconds, or when the pipe ends first. Reads the pipe's descriptor a byte at a time: nothing past
    that line is taken, and nothing is left in the file object's buffer, so `communicate()` later
    gets all the rest.
    """
    fd = pipe.fileno()
    lines: list[str] = []
    current = bytearray()

    def seen() -> str:
        return "".join(lines) + current.decode(errors="replace")

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout:.0f}s; output so far:\n{seen()}")
            if not selector.select(remaining):
                continue
            byte = os.read(fd, 1)
            if not byte:
                raise AssertionError(f"the output ended before {what}; output:\n{seen()}")
            current += byte
            if byte == b"\n":
                lines.append(current.decode(errors="replace"))
                current.clear()
                if done(lines[-1]):
                    return lines
