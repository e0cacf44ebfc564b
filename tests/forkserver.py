"""A warm interpreter that forks the tests' ``python -m mnist_cnn.<command>`` processes.

Each CLI run is still a process of its own: its pid, argv, working directory, environment,
standard streams, signals and exit status, all as ``python -m`` gives them. Only the imports of
torch, Lightning and Hydra (seconds per process) are done once, here; ``mnist_cnn`` itself is
imported fresh in every process (its run id is drawn at import). ``conftest.cli`` and
``conftest.start`` use it; ``CLI_FRESH=1`` runs them as plain subprocesses instead.

python tests/forkserver.py SOCKET   # serves until its parent (the pytest session) exits
"""

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

WARM = ("torch", "lightning", "hydra", "omegaconf", "torchvision", "torchmetrics", "tensorboard")


class Forked:
    """What a test needs of ``subprocess.Popen`` for a process the server forked."""

    def __init__(self, conn: socket.socket, args: list[str], text: bool, stdout=None, stderr=None):
        self.args, self.returncode, self._conn, self.text = args, None, conn, text
        self.stdout, self.stderr = stdout, stderr
        self.pid = int(self._line())

    def _line(self, timeout: float | None = None) -> str:
        self._conn.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._conn.recv(64)
            if not chunk:
                raise RuntimeError("the fork server is gone")
            data += chunk
        return data.decode().strip()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.wait(timeout=0)
            except subprocess.TimeoutExpired:
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                status = int(self._line(max(timeout, 1e-6) if timeout is not None else None))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.returncode = os.waitstatus_to_exitcode(status)
            self._conn.close()
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both streams read together (no pipe fills up), then the exit status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = {s: [] for s in (self.stdout, self.stderr) if s is not None}
        with selectors.DefaultSelector() as sel:
            for stream in out:
                sel.register(stream, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if chunk:
                        out[key.fileobj].append(chunk)
                    else:
                        sel.unregister(key.fileobj)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        both = [b"".join(out[s]) if s in out else None for s in (self.stdout, self.stderr)]
        return tuple(b.decode(errors="replace") if self.text and b is not None else b for b in both)

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork(path: str, module: str, args: list[str], cwd=None, env=None, stdout=None, stderr=None,
         text=False) -> Forked:  # fmt: skip
    """``python -m module *args`` forked by the server at ``path``, with ``cwd`` and ``env``
    (default: this process's); ``stdout``/``stderr`` as ``subprocess.Popen`` takes them: a
    file, ``PIPE`` (then ``.stdout``/``.stderr``, text with ``text``), ``STDOUT``, ``DEVNULL``."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    pipes, fds, mine = {}, [0], []  # fd 0: what a subprocess inherits (pytest wraps sys.stdin)
    for name, target in (("stdout", stdout), ("stderr", stderr)):
        if target is subprocess.PIPE:
            r, w = os.pipe()
            pipes[name] = open(r, "r" if text else "rb", buffering=-1 if text else 0)  # noqa: SIM115
            fds.append(w)
            mine.append(w)
        elif target is subprocess.DEVNULL:
            fds.append(os.open(os.devnull, os.O_WRONLY))
            mine.append(fds[-1])
        elif target is subprocess.STDOUT:
            fds.append(fds[-1])
        elif target is not None:
            fds.append(target.fileno())
        else:  # inherited, as pytest's capture sees a subprocess's output
            fds.append(1 if name == "stdout" else 2)
    request = {"module": module, "args": args, "cwd": str(cwd or os.getcwd())}
    request["env"] = dict(os.environ if env is None else env)
    socket.send_fds(conn, [json.dumps(request).encode()], fds)
    for fd in mine:
        os.close(fd)
    return Forked(conn, [sys.executable, "-m", module, *args], text, **pipes)


def _child(request: dict, fds: list[int]) -> None:
    """In the forked process: become ``python -m module *args`` and never return."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.getcwd(), *extra, *BASE_PATH]
        sys.argv = [sys.argv[0], *request["args"]]
        sys.orig_argv = [sys.executable, "-m", request["module"], *request["args"]]
        import runpy

        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            import traceback

            traceback.print_exc()
            code = -signal.SIGINT
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # as the interpreter ends: its threads, then atexit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if code == -signal.SIGINT:  # an uncaught Ctrl-C ends Python by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code & 0xFF)


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    parent = os.getppid()
    while os.getppid() == parent:
        listener.settimeout(0.02)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            conn = None
        if conn is not None:
            conn.settimeout(None)
            message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                _child(json.loads(message), fds)
            for fd in set(fds):
                os.close(fd)
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if (done := waiting.pop(pid, None)) is not None:
                with contextlib.suppress(OSError):  # the test may have gone
                    done.sendall(f"{status}\n".encode())
                done.close()


if __name__ == "__main__":
    here = str(Path(__file__).resolve().parent)
    BASE_PATH = [p for p in sys.path if p not in ("", here)]
    for name in WARM:
        __import__(name)
    import lightning.pytorch  # noqa: F401
    import matplotlib.pyplot  # noqa: F401

    serve(sys.argv[1])
