"""python -m mnist_cnn.serve as a real server process on 127.0.0.1, with a real checkpoint, its
answers compared with python -m mnist_cnn.predict's for the same files."""

import base64
import contextlib
import http.client
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import (
    bomb_png,
    cli,
    forged_png,
    group_alive,
    import_or_skip,
    parse,
    photo,
    post,
    save_jpeg,
    serving,
    small_checkpoint,
    start_server,
    wait_healthy,
)
from PIL import Image
from torchvision.datasets import MNIST

pytestmark = pytest.mark.slow

import_or_skip("litserve", "the serve extra: pip install -e '.[serve]'")

MAX_BYTES = 1_000_000  # the server's max_bytes in these tests
MAX_PIXELS = 1_000_000  # its max_pixels
MAX_CONNECTIONS = 50  # its max_connections (the concurrency test opens 36)
REQUEST_TIMEOUT = 5  # its request_timeout


def as_json(data: bytes, prefix: str = "") -> bytes:
    return json.dumps({"image": prefix + base64.b64encode(data).decode()}).encode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_dir):
    return small_checkpoint(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def digits(ckpt, data_dir, tmp_path_factory):
    """32 different test digits as files (PNG, RGB PNG, a JPEG photo with EXIF orientation,
    16-bit PNG) and predict's answer for each: ``{path: (class, index, probability)}``."""
    test = MNIST(str(data_dir), train=False)
    folder = tmp_path_factory.mktemp("digits")
    for i in range(32):
        digit = test.data[100 + i].numpy()
        kind = i % 4
        if kind == 0:
            Image.fromarray(255 - digit).resize((90, 90)).save(folder / f"{i:02d}.png")
        elif kind == 1:
            Image.fromarray(digit).convert("RGB").save(folder / f"{i:02d}.png")
        elif kind == 2:
            save_jpeg(photo(digit), folder / f"{i:02d}.jpg", orientation=6)
        else:
            Image.fromarray((255 - digit).astype(np.uint16) * 257).save(folder / f"{i:02d}.png")
    proc = cli("predict", f"ckpt_path={ckpt}", f"inputs=[{folder}]", cwd=folder, timeout=120)
    answers = parse(proc.stdout)
    assert len(answers) == 32
    return {folder / name: answer for name, answer in answers.items()}


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("serve")
    # on the CPU, as predict: the answers must match to 1e-3 (test_page.py serves with auto)
    limits = [f"max_bytes={MAX_BYTES}", f"max_pixels={MAX_PIXELS}"]
    limits += [f"max_connections={MAX_CONNECTIONS}", f"request_timeout={REQUEST_TIMEOUT}"]
    with serving(ckpt, cwd, *limits, "accelerator=cpu") as url:
        yield url
    assert list(cwd.iterdir()) == [cwd / "serve.log"]  # serving writes nothing (no client.py)


def check_answer(status: int, answer: dict, expected: tuple[str, int, float]) -> None:
    assert status == 200, answer
    name, index, probability = expected
    assert (answer["class"], answer["index"]) == (name, index)
    assert answer["probability"] == pytest.approx(probability, abs=1e-3)  # predict prints 4 places
    assert answer["classes"] == [str(i) for i in range(10)]
    assert answer["probabilities"][index] == answer["probability"] == max(answer["probabilities"])
    assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)


def test_png_jpeg_and_base64_json_are_answered_as_predict_answers(server, digits):
    for path, expected in list(digits.items())[:4]:  # one of each kind
        data = path.read_bytes()
        kind = "image/jpeg" if path.suffix == ".jpg" else "image/png"
        check_answer(*post(server, data, kind), expected)
        check_answer(*post(server, as_json(data), "application/json"), expected)
        data_url = f"data:{kind};base64,"  # what a browser's canvas.toDataURL() gives
        check_answer(*post(server, as_json(data, data_url), "application/json"), expected)
    path, expected = next(iter(digits.items()))
    check_answer(*post(server, path.read_bytes(), None), expected)  # no Content-Type: bytes


def test_bad_bodies_are_4xx_with_a_message_and_serving_goes_on(server, digits, tmp_path):
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    png = next(iter(digits)).read_bytes()
    cases = [
        (b"just some text", "image/png", 400, "not an image Pillow can read"),
        (b"", "image/png", 400, "the request body is empty"),
        (png[:300], "image/png", 400, "damaged or truncated"),
        (bomb_png(), "image/png", 413, "decompression bomb"),
        (forged_png(), "image/png", 413, "10,000,000,000 pixels"),
        (as_json(forged_png()), "application/json", 413, "decompression bomb"),
        ((tmp_path / "blank.png").read_bytes(), "image/png", 400, "blank"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"picture": "abc"}', "application/json", 400, 'no "image" string'),
        (b'{"image": "***"}', "application/json", 400, "not valid base64"),
        (as_json(b"not an image"), "application/json", 400, "not an image Pillow can read"),
    ]
    first, expected = next(iter(digits.items()))
    for body, kind, status, words in cases:
        got, answer = post(server, body, kind)
        assert (got, set(answer)) == (status, {"detail"}), (words, got, answer)
        assert words in answer["detail"], (words, answer)
        if status == 400:  # says what to send
            assert "image/png" in answer["detail"] or "blank" in answer["detail"], answer
        check_answer(*post(server, first.read_bytes()), expected)  # still serving
    # too large: answered before the body is read, whether its length is announced or streamed
    for chunked in (False, True):
        got, answer = too_large(server, chunked)
        assert got == 413 and f"max_bytes={MAX_BYTES:,}" in answer["detail"], answer
        check_answer(*post(server, first.read_bytes()), expected)


def too_large(url: str, chunked: bool) -> tuple[int, dict]:
    """POST /predict of MAX_BYTES + 1 bytes: announced by Content-Length and never sent, or
    sent as one chunk of a chunked body that never ends. The answer is read once that is sent,
    so a server that answers without reading the rest cannot break the pipe under the client."""
    port = int(url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    size = MAX_BYTES + 1
    if chunked:
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders(b"%x\r\n" % size + b"x" * size + b"\r\n")
    else:
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
    with contextlib.closing(connection):
        response = connection.getresponse()
        return response.status, json.loads(response.read())


def test_32_concurrent_requests_each_get_their_own_answer_bad_ones_alongside(server, digits):
    start = threading.Barrier(36)

    def ask(body: bytes, kind: str = "image/png"):
        start.wait()
        return post(server, body, kind)

    paths = list(digits)
    with ThreadPoolExecutor(36) as pool:
        good = [pool.submit(ask, p.read_bytes()) for p in paths]
        bad = [pool.submit(ask, b"junk"), pool.submit(ask, b""), pool.submit(ask, forged_png())]
        bad.append(pool.submit(ask, b"{", "application/json"))
        for path, future in zip(paths, good, strict=True):
            check_answer(*future.result(), digits[path])
        assert [f.result()[0] for f in bad] == [400, 400, 413, 400]


def test_the_page_is_at_the_root(server):
    with urllib.request.urlopen(server + "/", timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    assert '<canvas id="canvas"' in page and 'fetch("predict"' in page


def test_bad_settings_and_checkpoints_are_one_line_and_exit_2(ckpt, tmp_path):
    bogus = tmp_path / "bogus.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            ([], "ckpt_path is required"),
            ([f"ckpt_path={bogus}"], f"Cannot use checkpoint {bogus}"),
            ([f"ckpt_path={ckpt}", f"port={port}"], f"port={port}: cannot listen on 127.0.0.1"),
            ([f"ckpt_path={ckpt}", "host=example.com"], "host='example.com'"),
            ([f"ckpt_path={ckpt}", "max_batch_size=0"], "max_batch_size=0: a whole number"),
            ([f"ckpt_path={ckpt}", "max_connections=0"], "max_connections=0: a whole number"),
            ([f"ckpt_path={ckpt}", "accelerator=tpu"], "accelerator='tpu': use one of auto"),
        ]
        if not torch.cuda.is_available():
            cases.append(([f"ckpt_path={ckpt}", "accelerator=cuda"], "torch sees no CUDA GPU"))
        for args, words in cases:
            proc = cli("serve", *args, cwd=tmp_path, code=2, timeout=300)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and words in lines[0], (words, proc.stderr)
    assert sorted(tmp_path.iterdir()) == [bogus]


def digit_png(mnist_digit: np.ndarray, side: int, height: int | None = None) -> bytes:
    """An MNIST digit drawn on a ``side`` x ``height`` canvas, as PNG bytes."""
    image = Image.fromarray(255 - mnist_digit).resize((side, height or side))
    with io.BytesIO() as out:
        image.save(out, "PNG")
        return out.getvalue()


def test_an_image_over_max_pixels_is_413_before_it_is_decoded(server, data_dir):
    digit = MNIST(str(data_dir), train=False).data[0].numpy()  # a 7
    status, answer = post(server, digit_png(digit, 1000))  # 1,000,000 pixels: at the limit
    assert status == 200 and answer["class"] == "7", answer
    status, answer = post(server, digit_png(digit, 1000, 1001))
    assert status == 413 and f"1,001,000 pixels is more than max_pixels={MAX_PIXELS:,}" in str(
        answer
    )


def test_json_nested_100000_deep_is_a_400(server, digits):
    status, answer = post(server, b"[" * 100_000, "application/json")
    assert status == 400 and "nested too deeply" in answer["detail"], answer
    path, expected = next(iter(digits.items()))
    check_answer(*post(server, path.read_bytes()), expected)  # still serving; no traceback


def partial_request(port: int) -> socket.socket:
    """A connection that sends part of its headers and then nothing (a slow client)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n")
    return s


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""  # blocks until the server answers or closes (hang guard: 120 s)
    except ConnectionResetError:
        return True


def test_slow_clients_cannot_starve_good_ones(server, digits):
    port = int(server.rsplit(":", 1)[1])
    path, expected = next(iter(digits.items()))
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=120)  # keep-alive
    kept.request("POST", "/predict", path.read_bytes(), {"Content-Type": "image/png"})
    assert kept.getresponse().read()  # answered; then it sends its next request slowly:
    kept.sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    slow = [partial_request(port) for _ in range(5 * MAX_CONNECTIONS)]  # as a slowloris
    slow.insert(4 * MAX_CONNECTIONS, kept.sock)  # evicted, or closed by request_timeout
    try:
        for path, expected in list(digits.items())[:3]:  # answered at once: the oldest make room
            check_answer(*post(server, path.read_bytes()), expected)
        assert sum(closed_by_server(s) for s in slow[: 4 * MAX_CONNECTIONS]) == 4 * MAX_CONNECTIONS
        # the newest slow ones kept their places, then request_timeout closes them too
        assert all(closed_by_server(s) for s in slow[4 * MAX_CONNECTIONS :])
    finally:
        for s in slow:
            s.close()


def test_sigterm_finishes_the_requests_in_progress(ckpt, digits, tmp_path):
    proc, port = start_server(ckpt, tmp_path, "accelerator=cpu", "grace_period=60")
    log = tmp_path / "serve.log"
    path, expected = next(iter(digits.items()))
    png = path.read_bytes()
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        check_answer(*post(f"http://127.0.0.1:{port}", png), expected)
        s = socket.create_connection(("127.0.0.1", port), timeout=120)
        head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(png)}\r\n\r\n"
        s.sendall(head.encode() + png[:20])  # a request in progress
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while "Shutting down" not in log.read_text():  # uvicorn stops taking connections
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        s.sendall(png[20:])
        with s, s.makefile("rb") as answer:
            assert answer.readline().startswith(b"HTTP/1.1 200"), log.read_text()[-3000:]
        assert proc.wait(timeout=120) is not None and not group_alive(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_litserves_monitor_outliving_its_manager_at_shutdown_is_no_traceback(caplog):
    from mnist_cnn.serve import ManagerGone

    logger = logging.getLogger("litserve.server")  # the logger LitServe's monitor thread uses
    gone = ManagerGone()
    logger.addFilter(gone)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), RuntimeError("a real crash")):
            try:
                raise error
            except Exception:
                logger.exception("Monitoring worker crashed")
        logger.error("Monitoring worker crashed")  # no exception: kept
    finally:
        logger.removeFilter(gone)
    kept = [r.exc_info[1] if r.exc_info else None for r in caplog.records if r.name == logger.name]
    assert [type(e) for e in kept] == [RuntimeError, type(None)]
