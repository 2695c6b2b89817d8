"""Environment variables for a Ray cluster a test starts: its processes inherit them at start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """Set ``updates`` in ``os.environ``, and restore what was there (or wasn't) afterwards."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
