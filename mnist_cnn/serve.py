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
or over Pillow's pixel limit is answered 4xx ``{"detail": "..."}``, and serving goes on.
"""

import base64
import binascii
import importlib.resources
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Annotated

import hydra
import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from omegaconf import DictConfig
from starlette.concurrency import run_in_threadpool

from mnist_cnn.checkpoint import CheckpointError, load_model
from mnist_cnn.images import ImageError, ImageTooLarge, class_names, open_image, prepare, spec
from mnist_cnn.validate import ConfigError, run, task

log = logging.getLogger(__name__)
MAIN_PID = os.getpid()

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
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
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
        return prepare(open_image(data, name="the image sent"), **state.spec).numpy()

    try:
        return await run_in_threadpool(decode)
    except ImageTooLarge as e:
        raise HTTPException(413, str(e)) from None
    except ImageError as e:
        raise HTTPException(400, f"{e}. Send a digit image: {SEND}") from None


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
    for key in ("batch_timeout", "timeout"):
        if not isinstance(cfg.get(key), int | float) or cfg.get(key) < 0:
            raise ConfigError(f"{key}={cfg.get(key)!r}: seconds, 0 or more, are needed")
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
    # the page replaces LitServe's "litserve running" at /
    server.app.router.routes = [
        r for r in server.app.router.routes if getattr(r, "path", "") != "/"
    ]
    server.app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    return server


def stop(signum, frame) -> None:
    """SIGTERM: in this process as Ctrl-C; in LitServe's forked HTTP servers, as by default."""
    if os.getpid() == MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
@task
def main(cfg: DictConfig) -> None:
    try:
        server = build(cfg)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, stop)  # as Ctrl-C: LitServe stops its workers and servers
    log.info("the drawing page: http://%s:%s/", cfg.host, cfg.port)
    server.run(
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        generate_client_file=False,
    )


if __name__ == "__main__":
    run(main)
