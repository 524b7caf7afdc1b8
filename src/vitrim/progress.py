"""Progress of long work that is visible in a terminal and in a log: a tqdm bar when the output is a
terminal, plain lines (``desc: 3/10 evit keep_rate=0.7 (12 s)``) when it is a file or a pipe, so a
piped run is never silent for long."""
from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, Optional

__all__ = ["Progress", "progress"]


class Progress:
    """A progress reporter with tqdm's small interface (``update``, ``set_postfix_str``, ``close``,
    iteration, context manager).

    Args:
        iterable: what to iterate over (optional).
        total: the number of steps (default: ``len(iterable)``).
        desc: what is running.
        enabled: ``False``: report nothing.
        every: in line mode, at most one line per ``every`` seconds (the first and the last step are
            always reported).
        stream: where to write (default: standard error).
    """

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 enabled: bool = True, every: float = 10.0, stream: Optional[IO[str]] = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.enabled, self.every = desc, enabled, every
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()
        self._printed_at = -1
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ reporting
    def _line(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every and self.n != 1:
            return
        if self._printed_at == self.n:
            return
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count}{extra} ({now - self.start:.0f} s)", file=self.stream, flush=True)
        self.last, self._printed_at = now, self.n

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._line(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ------------------------------------------------------------------ protocols
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, **kwargs) -> Progress:
    """:class:`Progress` over ``iterable`` (see its arguments)."""
    return Progress(iterable, **kwargs)
