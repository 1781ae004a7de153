"""The playground in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) opens `/`, sends a question and a "draw" request as a person would, and must show the
streamed answer text and a generated <img>; on a speech model it uploads a WAV through the file input,
gets its transcript, and asks for a spoken answer, which must play from an <audio>. Screenshots are
saved as artifacts.

The servers run random weights (shapes-tiny, speech-tiny), so the text is gibberish; the test pins the
seed in the settings panel and checks the page shows exactly what the API answers for the same request.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import httpx
import selenium.webdriver as webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from nmm.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")

# No internet here: without these, Chromium's background services (updates, sync, QUIC probes) hang.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1100,800"]


@pytest.fixture(scope="module")
def server_url(served, live):
    with live(create_app(*served)) as url:
        yield url


@pytest.fixture()
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:  # a fresh profile every time
        options.add_argument(flag)
    # The driver path is given, so Selenium Manager (which would try to download one) never runs.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def artifact_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("NMM_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def finished_answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant:not(.pending)")


def test_playground_chat_and_picture(server_url, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(server_url + "/")
    wait.until(lambda d: "shapes-tiny-random" in d.find_element(By.ID, "model").text)
    seed = browser.find_element(By.ID, "seed")
    seed.send_keys("7")

    question = "what colour is the circle?"
    send(browser, question)
    wait.until(lambda d: len(finished_answers(d)) == 1)
    reply = finished_answers(browser)[0]
    assert "error" not in reply.get_attribute("class"), reply.text
    # What the page shows is what the API answers for the same request (the panel's defaults, seed 7).
    api = httpx.post(server_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": question}], "temperature": 0.3, "top_p": 1, "max_tokens": 48,
        "cfg_scale": 2, "seed": 7}).json()
    expected = api["choices"][0]["message"]["content"] or "(empty answer)"
    shown = reply.find_element(By.TAG_NAME, "p").get_attribute("textContent")  # raw text, not layout text
    assert shown == expected and shown.strip()

    send(browser, "draw a small red circle at the top left")
    wait.until(lambda d: len(finished_answers(d)) == 2)
    picture = finished_answers(browser)[1]
    images = picture.find_elements(By.TAG_NAME, "img")
    assert len(images) == 1
    assert images[0].get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0]) == 32
    user_bubbles = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")
    assert [b.text for b in user_bubbles] == [question, "draw a small red circle at the top left"]

    shot = artifact_dir(tmp_path) / "playground.png"
    shot.write_bytes(base64.b64decode(browser.get_screenshot_as_base64()))
    assert shot.stat().st_size > 1000
    print(f"playground screenshot: {shot}")


@pytest.fixture(scope="module")
def speech_url(served_speech, live):
    with live(create_app(*served_speech)) as url:
        yield url


def test_playground_audio_upload_and_spoken_answer(speech_url, browser, tmp_path):
    wait = WebDriverWait(browser, 60)
    browser.get(speech_url + "/")
    wait.until(lambda d: "speech-tiny-random" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "seed").send_keys("7")
    clip = tmp_path / "clip.wav"
    t = np.arange(16_000) / 16_000
    sf.write(clip, 0.3 * np.sin(2 * np.pi * 220 * t), 16_000, subtype="PCM_16")

    def attach() -> None:  # through the (hidden) file input, as a person choosing a file would
        file_input = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false", file_input)  # WebDriver types only into shown inputs
        file_input.send_keys(str(clip))
        wait.until(lambda d: d.find_element(By.ID, "audio-attachment").is_displayed())

    attach()  # the audio alone: the answer is its transcript, as the API gives it
    send(browser, "")
    wait.until(lambda d: len(finished_answers(d)) == 1)
    reply = finished_answers(browser)[0]
    assert "error" not in reply.get_attribute("class"), reply.text
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(),
                                                   "format": "wav"}}
    api = httpx.post(speech_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": ""}]}], "temperature": 0.3,
        "top_p": 1, "max_tokens": 48, "cfg_scale": 2, "seed": 7}).json()
    expected = api["choices"][0]["message"]["content"] or "(empty answer)"
    assert reply.find_element(By.TAG_NAME, "p").get_attribute("textContent") == expected
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.user audio")) == 1

    attach()
    browser.find_element(By.ID, "speak").click()
    send(browser, "water")
    wait.until(lambda d: len(finished_answers(d)) == 2)
    spoken = finished_answers(browser)[1]
    assert "error" not in spoken.get_attribute("class"), spoken.text
    players = spoken.find_elements(By.TAG_NAME, "audio")
    assert len(players) == 1 and spoken.find_element(By.TAG_NAME, "p").get_attribute("textContent") == "water"
    src = players[0].get_attribute("src")
    assert src.startswith("data:audio/wav;base64,")
    wave, rate = sf.read(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert rate == 16_000 and wave.ndim == 1
    # Chromium can load it: metadata (the duration) is read once the element has parsed the WAV.
    wait.until(lambda d: d.execute_script("return arguments[0].readyState", players[0]) >= 1)

    shot = artifact_dir(tmp_path) / "playground-audio.png"
    shot.write_bytes(base64.b64decode(browser.get_screenshot_as_base64()))
    print(f"playground screenshot: {shot}")
