"""Files written whole: checkpoints, exports, the run's record, MNIST's files and a search's
``best.yaml`` are all written through ``writing``."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def writing(path: str | os.PathLike, partial=None, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary name beside ``path`` to write (``<path>.partial``, or ``partial``:
    one per process where several may write ``path`` at once); renamed to ``path`` when the
    block succeeds, removed when it fails, so no reader (a resume, another rank, a sweep job)
    sees a half-written file. ``OSError`` up front when the folder cannot be written.
    ``fsync``: on disk before the rename, so the file survives a power cut."""
    path = Path(path)
    partial = Path(partial) if partial else path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial.touch()
    try:
        yield partial
        if fsync:
            with partial.open("rb+") as f:
                os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
