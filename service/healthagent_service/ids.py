"""Ids unique across processes, replicas and restarts, without a random draw per id.

`secrets.token_hex` per id costs a `getrandom` system call each time (two per Chat turn for the
history's message ids, one per call for request ids). Here each process draws a random prefix
once (again in a forked child, which would otherwise repeat its parent's ids) and counts up.
The ids are not secrets: nothing is authorized by knowing one.
"""

from __future__ import annotations

import itertools
import os
import secrets
import weakref


class UniqueIds:
    """`prefix` + 16 random hex digits drawn per process + a hex counter of `counter_digits`
    (more once it overflows), e.g. 32 hex digits in all like a UUID's for 16."""

    def __init__(self, prefix: str = "", *, counter_digits: int = 16) -> None:
        self._prefix = prefix
        self._format = f"0{counter_digits}x"
        self._redraw()
        _all_ids.add(self)

    def _redraw(self) -> None:
        self._process_prefix = f"{self._prefix}{secrets.token_hex(8)}"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._process_prefix}{format(next(self._counter), self._format)}"


_all_ids: weakref.WeakSet[UniqueIds] = weakref.WeakSet()


def _redraw_all() -> None:
    for ids in list(_all_ids):
        ids._redraw()


os.register_at_fork(after_in_child=_redraw_all)
