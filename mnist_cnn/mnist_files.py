"""The four MNIST files in ``<data_dir>/MNIST/raw``: copied (``--from``) or downloaded, verified
by MD5 and SHA-256, extracted once, under a lock shared by every process that prepares them.

python -m mnist_cnn.data --from /folder/with/the/gz/files   # (this module's main)
"""

import argparse
import errno
import gzip
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.client import HTTPException
from pathlib import Path

from filelock import FileLock, Timeout
from torchvision.datasets import MNIST
from torchvision.datasets.utils import download_url

from mnist_cnn.errors import DataError
from mnist_cnn.files import writing
from mnist_cnn.validate import file_in_the_way

log = logging.getLogger(__name__)

# name: (MD5 of the .gz, size and SHA-256 of the extracted IDX file)
RAW_FILES = {
    "train-images-idx3-ubyte": (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        "d53e105ee54ea40749a09fcbcd1e9432",
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        "9fb629c4189551a2d022fa330f9573f3",
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        "ec29112dd5afa0611ce80d1b7f02629c",
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ANOTHER_FOLDER = "point to another folder with `data.data_dir=/path` or MNIST_DATA_DIR"


def _digest(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, path.read_bytes()).hexdigest()


def _idx_problem(path: Path, size: int, sha256: str) -> str | None:
    """Why an extracted IDX file is unusable, or None when its content is MNIST's."""
    if not path.exists():
        return "missing"
    if (found := path.stat().st_size) != size:
        return f"{found} bytes instead of {size}"
    return None if _digest(path, "sha256") == sha256 else "corrupted: its SHA-256 is not MNIST's"


def _idx_problems(raw: Path) -> dict[str, str]:
    return {n: p for n, (_, s, h) in RAW_FILES.items() if (p := _idx_problem(raw / n, s, h))}


def raw_problems(raw_dir: Path) -> dict[str, str]:
    """Problems of the four ``.gz`` files in ``raw_dir`` by file name (empty when all verify)."""
    problems = {}
    for name, (md5, _, _) in RAW_FILES.items():
        gz = raw_dir / f"{name}.gz"
        if not gz.exists():
            problems[gz.name] = "missing"
        elif (found := _digest(gz, "md5")) != md5:
            problems[gz.name] = f"MD5 {found} instead of {md5} (truncated or corrupted)"
    return problems


def _missing_data_message(data_dir: Path, problems: dict[str, str], reason: str) -> str:
    raw = data_dir / "MNIST" / "raw"
    listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
    return (
        f"MNIST could not be prepared in {raw} ({listed}): {reason}. Put the four original files "
        f"{', '.join(n + '.gz' for n in RAW_FILES)} there (they are verified by MD5 and "
        "extracted), e.g. with `python -m mnist_cnn.data --from /folder/with/them`, or point to "
        "a folder that holds them in MNIST/raw/ with `data.data_dir=/path` or the environment "
        "variable MNIST_DATA_DIR."
    )


def _os_error(data_dir: Path, error: OSError, doing: str = "") -> DataError:
    """The one-line error for a data folder that cannot be read or written: the disk is full,
    a file is in its way, or a permission is missing."""
    if error.errno in DISK_FULL:
        return DataError(
            f"No room on the disk for MNIST in {data_dir}{doing} ({error.strerror}): it needs "
            f"about 70 MB there. Free some space on that disk, or {ANOTHER_FOLDER}."
        )
    if blocker := file_in_the_way(data_dir / "MNIST" / "raw"):
        where = "it is" if blocker == data_dir else f"{blocker} is"
        return DataError(
            f"Cannot use the data folder {data_dir}: {where} a file, not a folder. Pass a folder "
            "(it holds MNIST/raw/) with `data.data_dir=/path` or MNIST_DATA_DIR."
        )
    return DataError(
        f"Cannot use {error.filename or data_dir}{doing} ({error.strerror or error}): make it "
        f"readable and writable for this user (chmod, chown), or {ANOTHER_FOLDER}."
    )


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable, str(default))
    with suppress(ValueError):
        if 0 < float(value) < 1e9:
            return float(value)
    raise DataError(f"{variable}={value}: use a number of seconds, e.g. {variable}={default:g}")


def _holder(holder_file: Path) -> tuple[str, str]:
    """Who holds the lock, as it wrote beside it, and for how long, in words."""
    with suppress(OSError, ValueError, KeyError, TypeError):
        h = json.loads(holder_file.read_text())
        return (
            f"pid {h['pid']} on {h['host']}: {h['command'][:200]}",
            f"{time.time() - h['since']:.0f} s",
        )
    return "which has not said who it is yet", "a while"


@contextmanager
def _prepare_lock(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir``'s preparation lock. A waiter says who holds it after a quiet moment and
    gives up after MNIST_LOCK_TIMEOUT s. The lock is an flock: the OS releases it when its holder
    exits, even by kill -9, so a dead holder never blocks and there is nothing to delete."""
    lock_file = data_dir / "MNIST" / ".prepare.lock"
    holder_file = lock_file.with_name(".prepare.lock.holder")
    wait = _seconds("MNIST_LOCK_TIMEOUT", 600)
    quiet = min(5, wait / 2)  # DDP ranks and sweep jobs take turns without a word
    lock = FileLock(str(lock_file))
    try:
        (data_dir / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=quiet)
        except Timeout:
            who, age = _holder(holder_file)
            log.warning(
                "Another process (%s) has been preparing MNIST in %s for %s: waiting for it, up "
                "to %g s (MNIST_LOCK_TIMEOUT)",
                who,
                data_dir,
                age,
                wait,
            )
            lock.acquire(timeout=wait - quiet)
    except Timeout:
        who, age = _holder(holder_file)
        raise DataError(
            f"Another process ({who}) has been preparing MNIST in {data_dir} for {age}; this one "
            f"gave up after waiting {wait:g} s (MNIST_LOCK_TIMEOUT). Wait for it, or stop it if "
            f"it hangs: the OS releases its lock {lock_file} when it exits, even when killed, so "
            "there is nothing to delete."
        ) from None
    except OSError as e:
        raise _os_error(data_dir, e) from None
    try:
        with suppress(OSError):  # only informs waiters
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            holder["command"] = " ".join(shlex.join(sys.orig_argv).split())  # one line
            unique = holder_file.with_name(f"{holder_file.name}.{os.getpid()}")
            with writing(holder_file, partial=unique) as written:  # a waiter reads it whole
                written.write_text(json.dumps(holder))
        yield
    finally:
        with suppress(OSError):
            holder_file.unlink()
        lock.release()


def prepare_mnist(data_dir: str | os.PathLike) -> Path:
    """Download or verify and extract MNIST under ``data_dir``; safe for concurrent processes.

    Every call checks the four extracted files by size and SHA-256 (0.06 s); a damaged one is
    made again from its .gz, with a warning."""
    data_dir = Path(data_dir)
    raw = data_dir / "MNIST" / "raw"
    with _prepare_lock(data_dir):
        try:
            if bad := _idx_problems(raw):
                _rebuild(raw, bad)
        except OSError as e:
            raise _os_error(data_dir, e) from None
    return raw


def _rebuild(raw: Path, bad: dict[str, str]) -> None:
    """Make the extracted files named in ``bad`` again: verify their .gz, download the missing
    ones, extract."""
    data_dir = raw.parent.parent
    for leftover in raw.glob(".*.partial"):  # of a killed process (we hold the lock)
        leftover.unlink()
    shutil.rmtree(raw / ".download", ignore_errors=True)
    for name, why in bad.items():
        if why != "missing":
            log.warning("rebuilding %s from its .gz (%s)", name, why)
            (raw / name).unlink()
    problems = raw_problems(raw)
    for gz, why in problems.items():  # kept for a look, never used
        if why != "missing":
            (raw / gz).rename(raw / f"{gz}.corrupt")
            log.warning("moved %s aside to %s.corrupt (%s)", gz, gz, why)
    need = [n for n in bad if f"{n}.gz" in problems]
    if need and (failure := _download(raw, need)):
        damaged = {n: f"{p} (removed)" for n, p in bad.items() if p != "missing"}
        needed = {f"{n}.gz": problems[f"{n}.gz"] for n in need}
        raise DataError(_missing_data_message(data_dir, damaged | needed, failure))
    _extract_all(raw, list(bad))
    if still := _idx_problems(raw):
        raise DataError(_missing_data_message(data_dir, still, "extraction gave bad files"))


def _download(raw: Path, names: list[str]) -> str | None:
    """Download the named .gz files with torchvision from ``MNIST.mirrors``; why not, or None.

    Ours, not ``MNIST(download=True)``, which writes to the final names and waits forever on a
    silent server: each file lands in ``.download/`` and is moved in once its MD5 verifies, and
    a server that stops answering times out after MNIST_DOWNLOAD_TIMEOUT s."""
    wait = _seconds("MNIST_DOWNLOAD_TIMEOUT", 30)
    tmp = raw / ".download"
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(wait)  # torchvision's urllib calls pass no timeout
    try:
        for name in names:
            silent, errors = [], []
            for mirror in MNIST.mirrors:
                try:
                    download_url(f"{mirror}{name}.gz", str(tmp), md5=RAW_FILES[name][0])
                    break
                except (RuntimeError, OSError, HTTPException) as e:
                    if isinstance(e, OSError) and e.errno in DISK_FULL:
                        raise
                    timed_out = isinstance(getattr(e, "reason", e), TimeoutError)  # URLError
                    (silent if timed_out else errors).append(mirror if timed_out else str(e))
            else:
                if silent:
                    return (
                        f"the download timed out: no answer from {' nor '.join(silent)} within "
                        f"{wait:g} s (MNIST_DOWNLOAD_TIMEOUT)"
                    )
                return f"torchvision's download failed ({errors[-1]})"
            (tmp / f"{name}.gz").replace(raw / f"{name}.gz")
    finally:
        socket.setdefaulttimeout(default)
        shutil.rmtree(tmp, ignore_errors=True)
    return None


def _extract_all(raw: Path, names: list[str]) -> None:
    """Extract each named (verified) .gz under a temporary name, renamed when complete: an
    interrupted extraction never leaves a file that passes as complete, a failed one no file."""
    for name in names:
        try:
            part = raw / f".{name}.partial"
            with (
                writing(raw / name, partial=part) as tmp,
                gzip.open(raw / f"{name}.gz", "rb") as src,
                tmp.open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as e:
            raise _os_error(raw.parent.parent, e, f" while extracting {name}.gz") from None


def copy_from(source: Path, data_dir: Path) -> None:
    """``--from``: copy the four .gz files from ``source`` into ``data_dir/MNIST/raw``, each
    checked by MD5 first (a damaged one is named and nothing is copied)."""
    names = ", ".join(f"{n}.gz" for n in RAW_FILES)
    found = {n: source / f"{n}.gz" for n in RAW_FILES if (source / f"{n}.gz").is_file()}
    if not found:
        what = "is not a folder" if source.exists() else "does not exist"
        what = "holds none of" if source.is_dir() else f"{what}: it should hold"
        raise DataError(
            f"--from {source} {what} the four MNIST files {names}. Pass the folder that holds "
            "them: --from /path/to/folder."
        )
    try:
        md5s = {n: _digest(src, "md5") for n, src in found.items()}
    except OSError as e:
        raise DataError(
            f"Cannot read {e.filename or source} ({e.strerror}): make it readable for this user "
            "(chmod a+r), then rerun."
        ) from None
    if damaged := [
        f"{found[n]}: MD5 {m} instead of {RAW_FILES[n][0]}"
        for n, m in md5s.items()
        if m != RAW_FILES[n][0]
    ]:
        raise DataError(
            f"Damaged in the --from folder (truncated or corrupted): {'; '.join(damaged)}. "
            "Nothing was copied: copy the original file there again, then rerun."
        )
    raw = data_dir / "MNIST" / "raw"
    with _prepare_lock(data_dir):
        for name, src in found.items():
            dst = raw / src.name
            try:
                if not (dst.exists() and _digest(dst, "md5") == md5s[name]):
                    with writing(dst, partial=raw / f".{src.name}.partial") as tmp:
                        shutil.copyfile(src, tmp)
            except OSError as e:
                raise _os_error(data_dir, e, f" while copying {src.name}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m mnist_cnn.data [--from DIR]``: copy the four .gz files, verify and extract."""

    from mnist_cnn import ROOT

    parser = argparse.ArgumentParser(
        description=main.__doc__,
        epilog="Environment: MNIST_DATA_DIR; MNIST_DOWNLOAD_TIMEOUT (seconds a silent server is "
        "waited for, 30); MNIST_LOCK_TIMEOUT (seconds another preparing process is waited for, "
        "600).",
    )
    default_dir = os.environ.get("MNIST_DATA_DIR", str(ROOT / "data"))
    parser.add_argument("--data-dir", default=default_dir, help=f"default {default_dir}")
    parser.add_argument("--from", dest="source", help="a folder holding the four .gz files")
    args = parser.parse_args(argv)
    try:
        if args.source:
            copy_from(Path(args.source), Path(args.data_dir))
        raw = prepare_mnist(args.data_dir)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MNIST verified in {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
