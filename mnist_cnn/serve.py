"""Serve a checkpoint over HTTP with LitServe: ``POST /predict``, and a drawing page at ``/``.

python -m mnist_cnn.serve ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt [port=8000]

curl -H 'Content-Type: image/png' --data-binary @digit.png http://127.0.0.1:8000/predict
curl -H 'Content-Type: application/json' -d '{"image": "<base64 of the file>"}' \\
    http://127.0.0.1:8000/predict
{"class": "7", "index": 7, "probability": 0.998, "classes": ["0", ...], "probabilities": [...]}

A request's image is read and prepared exactly as ``python -m mnist_cnn.predict`` does
(``images.open_image``, ``images.prepare`` with the checkpoint's ``images.spec``), in the HTTP
server's threads; the model then runs on batches of requests (``max_batch_size``,
``batch_timeout``) in LitServe's inference worker. A body that is empty, too large, not an image
or over ``max_pixels`` is answered 4xx ``{"detail": "..."}``, and serving goes on. The HTTP
server holds at most ``max_connections``, each given ``request_timeout`` seconds to send its
request; SIGTERM finishes the requests in progress (up to ``grace_period`` seconds), then stops.
"""

import base64
import binascii
import importlib.resources
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from typing import Annotated

import anyio
import h11
import hydra
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from omegaconf import DictConfig
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from mnist_cnn.checkpoint import load_model
from mnist_cnn.errors import CheckpointError, ConfigError, ImageError, ImageTooLarge
from mnist_cnn.images import class_names, open_image, prepare, spec
from mnist_cnn.validate import run, task

log = logging.getLogger(__name__)
MAIN_PID = os.getpid()
DECODERS = 4  # images decoded at once in an HTTP server (each holds up to max_pixels)

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe listens on
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
SEND = (
    "send the image file's bytes with Content-Type: image/png (or image/jpeg, ...), "
    'or JSON {"image": "<base64 of the file>"} with Content-Type: application/json'
)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it is over ``limit`` bytes (it is not all read)."""
    too_large = HTTPException(
        413, f"the request body is over max_bytes={limit:,} bytes: send a smaller image"
    )
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:  # gone, or closed for being too slow: there is no one to answer
        raise HTTPException(
            400, "the client closed the connection before its body was sent"
        ) from None
    return bytes(body)


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image file in ``body``: the body itself, or base64 in JSON ``{"image": ...}`` (a
    ``data:image/png;base64,`` prefix allowed); 400 naming what is wrong."""
    if not body:
        raise HTTPException(400, f"the request body is empty: {SEND}")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return body
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPException(400, f"the body is not valid JSON ({e}): {SEND}") from None
    except RecursionError:  # json's parser recurses once per [ or {
        raise HTTPException(400, f"the JSON is nested too deeply: {SEND}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
        raise HTTPException(400, f'the JSON has no "image" string: {SEND}')
    try:
        return base64.b64decode(payload["image"].rpartition("base64,")[2], validate=True)
    except (binascii.Error, ValueError) as e:
        raise HTTPException(400, f'"image" is not valid base64 ({e}): {SEND}') from None


async def prepared_image(request: Request) -> np.ndarray:
    """The request's image, prepared for the model, as a float32 array (a FastAPI dependency:
    it runs in the HTTP server, so a bad request never reaches a batch)."""
    state = request.app.state
    body = await read_body(request, state.max_bytes)
    data = image_bytes(body, request.headers.get("content-type", ""))

    def decode() -> np.ndarray:
        image = open_image(data, name="the image sent", max_pixels=state.max_pixels)
        return prepare(image, **state.spec).numpy()

    if not hasattr(state, "decoders"):  # made in the server's event loop, as anyio needs
        state.decoders = anyio.CapacityLimiter(DECODERS)
    try:
        return await anyio.to_thread.run_sync(decode, limiter=state.decoders)
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except ImageError as e:
        raise HTTPException(400, f"{e}. Send a digit image: {SEND}") from None


def bounded_http(max_connections: int, request_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the two bounds uvicorn has no setting for (its
    ``limit_concurrency`` answers 503 only once a request's headers have arrived and never
    closes a connection, so clients that send slowly could hold every connection).

    - A client has ``request_timeout`` seconds from connecting, or from its previous answer, to
      send its whole request (headers and body); then the connection is closed.
    - At ``max_connections`` open connections, a new one closes the connection that has waited
      longest for its request (a slow or idle client); when every connection has a request in
      progress, the new one is closed instead.
    """

    class BoundedH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.waiting_since: float | None = None
            self.timer = None
            open_ = [c for c in self.connections if not c.transport.is_closing()]
            if len(open_) > max_connections:
                waiting = [c for c in open_ if getattr(c, "waiting_since", None) is not None]
                if not waiting:
                    transport.close()
                    return
                min(waiting, key=lambda c: c.waiting_since).transport.close()
            self._wait()

        def _wait(self) -> None:
            """Wait for a request, for at most request_timeout seconds."""
            self._received()
            self.waiting_since = self.loop.time()
            self.timer = self.loop.call_later(request_timeout, self._too_slow)

        def _received(self) -> None:
            self.waiting_since = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def _too_slow(self) -> None:
            if self.waiting_since is not None and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):  # all in
                self._received()

        def on_response_complete(self) -> None:
            self._wait()  # for the next request on this connection (a pipelined one: below)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._received()
            super().connection_lost(exc)

    return BoundedH11


class ClassifierAPI(ls.LitAPI):
    """The checkpoint behind LitServe: prepared images in, class probabilities out, batched."""

    def __init__(self, ckpt_path: str, **batching):
        super().__init__(**batching)
        self.ckpt_path = ckpt_path

    def setup(self, device) -> None:
        if threading.current_thread() is threading.main_thread():  # Ctrl-C: the server stops us
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.model = load_model(self.ckpt_path, map_location=device)
        self.names = class_names(self.model.hparams)
        self.device = device

    def decode_request(self, request: Annotated[np.ndarray, Depends(prepared_image)]):
        return torch.from_numpy(request)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3  # max_batch_size=1: LitServe does not batch
        x = x.to(self.device)
        with torch.inference_mode():
            probs = self.model(x[None] if single else x).float().softmax(-1).cpu()
        return probs[0] if single else probs

    def encode_response(self, probs: torch.Tensor) -> dict:
        index = int(probs.argmax())
        return {
            "class": self.names[index],
            "index": index,
            "probability": float(probs[index]),
            "classes": self.names,
            "probabilities": probs.tolist(),
        }


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for a value LitServe would refuse with a traceback."""

    def whole(key: str, low: int, high: int | None = None) -> int:
        value = cfg.get(key)
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high else f"{low} or more"
            raise ConfigError(f"{key}={value!r}: a whole number {allowed} is needed")
        return value

    if not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is required: python -m mnist_cnn.serve "
            "ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt"
        )
    if cfg.host not in HOSTS:
        raise ConfigError(
            f"host={cfg.host!r}: LitServe listens on 127.0.0.1 (this machine only), "
            "0.0.0.0 or :: (every interface)"
        )
    if cfg.accelerator not in ACCELERATORS:
        raise ConfigError(
            f"accelerator={cfg.accelerator!r}: use one of {', '.join(ACCELERATORS)} "
            "(auto: the GPU when there is one)"
        )
    if cfg.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"accelerator={cfg.accelerator}: torch sees no CUDA GPU here; "
            "pass accelerator=auto or accelerator=cpu"
        )
    if cfg.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("accelerator=mps: torch sees no Apple GPU here; pass accelerator=auto")
    whole("port", 1024, 65535)
    whole("max_batch_size", 1)
    whole("workers", 1)
    whole("max_bytes", 1)
    whole("max_pixels", 1)
    whole("max_connections", 1)
    whole("max_header_bytes", 1024)
    for key in ("batch_timeout", "timeout", "keep_alive", "grace_period", "request_timeout"):
        value = cfg.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}={value!r}: seconds, 0 or more, are needed")
    if cfg.request_timeout == 0:
        raise ConfigError("request_timeout=0: a client needs some seconds to send its request")
    if cfg.batch_timeout >= cfg.timeout:
        raise ConfigError(
            f"batch_timeout={cfg.batch_timeout} must be less than timeout={cfg.timeout}"
        )
    with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as e:
            raise ConfigError(
                f"port={cfg.port}: cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); "
                "pass another port, e.g. port=8001"
            ) from None


def page() -> HTMLResponse:
    """The drawing page, ``mnist_cnn/serve.html``."""
    return HTMLResponse(importlib.resources.files("mnist_cnn").joinpath("serve.html").read_text())


def build(cfg: DictConfig) -> ls.LitServer:
    """The LitServer for ``cfg`` (``conf/serve.yaml``), checked; the checkpoint is loaded once
    here, so that a bad one stops before any worker starts."""
    check(cfg)
    # one thread here, before any torch work: LitServe forks its HTTP servers from this process,
    # and an OpenMP thread pool does not survive a fork (the inference workers are spawned)
    torch.set_num_threads(1)
    model = load_model(cfg.ckpt_path)
    try:
        how, names = spec(model.hparams), class_names(model.hparams)
    except ValueError as e:
        raise CheckpointError(f"Cannot serve checkpoint {cfg.ckpt_path}: {e}") from None
    del model
    api = ClassifierAPI(
        str(cfg.ckpt_path), max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout
    )
    server = ls.LitServer(
        api,
        accelerator=cfg.accelerator,
        workers_per_device=cfg.workers,
        timeout=cfg.timeout,
        model_metadata={"checkpoint": str(cfg.ckpt_path), "classes": names, **how},
    )
    server.app.state.spec, server.app.state.max_bytes = how, cfg.max_bytes
    server.app.state.max_pixels = cfg.max_pixels
    # LitServe passes this to uvicorn's timeout_graceful_shutdown and waits as long itself
    server.uvicorn_graceful_timeout = cfg.grace_period
    # the page replaces LitServe's "litserve running" at /
    server.app.router.routes = [
        r for r in server.app.router.routes if getattr(r, "path", "") != "/"
    ]
    server.app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    return server


def drain(grace_period: float):
    """The SIGTERM handler: LitServe's HTTP servers stop taking connections and finish the
    requests in progress (uvicorn's graceful shutdown, at most ``grace_period`` seconds) while
    the model still runs; then everything stops as on Ctrl-C. A second SIGTERM stops at once.
    In LitServe's forked HTTP servers, before uvicorn takes the signal over: as by default."""
    draining = []

    def stop(signum, frame) -> None:
        if os.getpid() != MAIN_PID:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if draining:
            raise KeyboardInterrupt
        draining.append(signum)
        # LitServe shuts its queues first on Ctrl-C: the HTTP servers must be done before
        servers = [p for p in multiprocessing.active_children() if p.name.startswith("LitServer")]
        log.info(
            "SIGTERM: finishing the requests in progress (at most grace_period=%gs), then stopping",
            grace_period,
        )
        for server in servers:
            os.kill(server.pid, signal.SIGTERM)
        for server in servers:
            server.join(grace_period + 5)
        raise KeyboardInterrupt

    return stop


class ManagerGone(logging.Filter):
    """Drops LitServe's "Monitoring worker crashed" when the crash is its multiprocessing
    Manager gone: at shutdown its monitor thread can outlive the Manager, and the traceback of
    that broken pipe says nothing about the server. Other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        gone = isinstance(error, BrokenPipeError | ConnectionResetError | EOFError)
        return not (gone and record.getMessage() == "Monitoring worker crashed")


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@task
def main(cfg: DictConfig) -> None:
    try:
        server = build(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, drain(cfg.grace_period))
    logging.getLogger("litserve.server").addFilter(ManagerGone())
    log.info("the drawing page: http://%s:%s/", cfg.host, cfg.port)
    server.run(
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        generate_client_file=False,
        # uvicorn's own settings, and our bounds on connections (bounded_http)
        http=bounded_http(cfg.max_connections, cfg.request_timeout),
        h11_max_incomplete_event_size=cfg.max_header_bytes,
        timeout_keep_alive=cfg.keep_alive,
    )


if __name__ == "__main__":
    run(main)
