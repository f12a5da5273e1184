"""Progress bars on stderr (tqdm where it is installed, else the plain iterable)."""

from __future__ import annotations

import sys


def progress(iterable, desc: str, total: int | None = None):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False)
