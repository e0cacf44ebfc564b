"""The drawing page at / in a real browser (Debian's chromium, driven by selenium): a stroke drawn
with the mouse or a finger goes to the real server, and the page shows the server's answer."""

import base64
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import import_or_skip, need, post, serving, small_checkpoint
from PIL import Image

import_or_skip("litserve", "the serve extra: pip install -e '.[serve]'")
webdriver = import_or_skip("selenium.webdriver", "the dev extra installs selenium")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.interaction import POINTER_TOUCH  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def url(tmp_path_factory, data_dir):
    ckpt = small_checkpoint(tmp_path_factory, data_dir)
    # one request at a time: LitServe's loop without batching (test_serve.py covers batches)
    cwd = tmp_path_factory.mktemp("page_server")
    with serving(ckpt, cwd, "max_batch_size=1", "batch_timeout=0") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    need(
        CHROMEDRIVER.exists() and Path(CHROMIUM).exists(),
        "the page test needs Debian's chromium and chromium-driver: "
        "apt-get install -y chromium chromium-driver (.ci/run does this)",
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.TemporaryDirectory(prefix="chromium-")
    flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run"
    flags += " --disable-background-networking --disable-component-update --disable-sync"
    for flag in [*flags.split(), f"--user-data-dir={profile.name}", "--window-size=1000,900"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def wait_for_answer(driver) -> str:
    WebDriverWait(driver, 120).until(lambda d: state(d) in ("answered", "error"))
    return state(driver)


def canvas_png(driver) -> bytes:
    data_url = driver.execute_script("return document.getElementById('canvas').toDataURL()")
    return base64.b64decode(data_url.partition(",")[2])


def shown(driver) -> dict:
    """What the page shows: the class, the probability line and the bars."""
    bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
    return {
        "class": driver.find_element(By.ID, "result-class").text,
        "probability": driver.find_element(By.ID, "result-probability").text,
        "bars": [
            (b.get_attribute("data-class"), float(b.get_attribute("data-probability")))
            for b in bars
        ],
        "top": [b.get_attribute("data-class") for b in bars if "top" in b.get_attribute("class")],
    }


def check_page_shows_the_servers_answer(driver, url: str) -> dict:
    """The server's answer for the canvas as drawn, checked against what the page shows."""
    status, answer = post(url, canvas_png(driver))
    assert status == 200, answer
    page = shown(driver)
    assert page["class"] == answer["class"] and page["top"] == [answer["class"]]
    assert page["probability"] == f"probability {answer['probability'] * 100:.1f}%"
    assert page["bars"] == list(zip(answer["classes"], answer["probabilities"], strict=True))
    return answer


def stroke_pixels(driver) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(canvas_png(driver))).convert("L"))


def test_a_mouse_stroke_is_sent_and_the_page_shows_the_answer(browser, url):
    browser.get(url + "/")
    assert state(browser) == "empty" and not browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    canvas = browser.find_element(By.ID, "canvas")
    draw = ActionChains(browser).move_to_element_with_offset(canvas, 0, -90).click_and_hold()
    for _ in range(9):  # a "1": straight down the middle
        draw.move_by_offset(0, 20)
    draw.release().perform()
    assert wait_for_answer(browser) == "answered"  # the end of the stroke asked by itself
    pixels = stroke_pixels(browser)
    assert pixels[140, 140] < 50 and pixels[140, 60] == 255 and pixels[10, 10] == 255
    answer = check_page_shows_the_servers_answer(browser, url)
    assert answer["class"] == "1", answer  # the checkpoint reads digits (~95% on MNIST)


def test_a_finger_stroke_and_the_buttons(browser, url):
    browser.get(url + "/")
    canvas = browser.find_element(By.ID, "canvas")
    box = canvas.rect
    finger = ActionBuilder(browser, mouse=PointerInput(POINTER_TOUCH, "finger"))
    x0, y0 = box["x"] + 80, box["y"] + 60
    finger.pointer_action.move_to_location(x0, y0).pointer_down()
    for dx, dy in [(60, 0), (60, 0), (-20, 40), (-20, 40), (-20, 40), (-20, 40)]:  # a "7"
        x0, y0 = x0 + dx, y0 + dy
        finger.pointer_action.move_to_location(x0, y0)
    finger.pointer_action.pointer_up()
    finger.perform()
    wait_for_answer(browser)
    assert stroke_pixels(browser).min() < 50  # the finger drew
    browser.find_element(By.ID, "predict").click()  # asks again: the same answer
    assert wait_for_answer(browser) == "answered"
    check_page_shows_the_servers_answer(browser, url)

    browser.find_element(By.ID, "clear").click()
    assert state(browser) == "empty" and stroke_pixels(browser).min() == 255
    assert not browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert browser.find_element(By.ID, "result-class").text == ""


def test_predict_on_a_blank_canvas_shows_the_servers_message(browser, url):
    browser.get(url + "/")
    browser.find_element(By.ID, "predict").click()
    assert wait_for_answer(browser) == "error"
    status, answer = post(url, canvas_png(browser))
    assert status == 400 and "blank" in answer["detail"]
    assert browser.find_element(By.ID, "status").text == answer["detail"]
