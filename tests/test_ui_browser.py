"""The real page in headless Chromium: `streamlit run ui/app.py` against the session's TorchServe.

Needs Debian's chromium and chromium-driver (scripts/setup.sh --browser installs them). The screenshot
of the answered upload, with "Show what the model looked at" on (the Grad-CAM overlay beside the image),
is saved to test-artifacts/ui_prediction.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ARTIFACTS, ROOT
from PIL import Image
from synthetic import class_images, sample_image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 60  # seconds for each step on a loaded 2-core machine

pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,
    pytest.mark.skipif(
        not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver: "
        "apt-get install -y chromium chromium-driver (or scripts/setup.sh --browser)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = WAIT) -> None:
    """Until Streamlit's health endpoint answers ok; fails with the log if the process dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok":
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    pytest.fail(f"streamlit not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def page_url(server, tmp_path):
    """The documented command on a free loopback port, configured for the session's server; stopped after."""
    port = free_port()
    log = tmp_path / "streamlit.log"
    env = {
        **os.environ,
        "CIFAR3_INFERENCE_URL": server.inference_url,
        "CIFAR3_MANAGEMENT_URL": server.management_url,
        "CIFAR3_TOKEN_FILE": str(server.key_file),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    env.pop("CIFAR3_TOKEN", None)
    streamlit = Path(sys.executable).parent / "streamlit"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                str(streamlit),
                "run",
                "ui/app.py",
                "--server.address",
                "127.0.0.1",
                "--server.port",
                str(port),
                "--server.headless",
                "true",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_in_a_browser_shows_the_prediction(server, page_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "ship.png"
    sample_image("ship", size=64).save(image)
    with open(image, "rb") as f:
        expected = requests.post(
            f"{server.inference_url}/predictions/cifar3",
            data=f.read(),
            timeout=30,
            headers={**server.headers(), "Content-Type": "application/octet-stream"},
        ).json()
    wait = WebDriverWait(browser, WAIT)

    browser.get(page_url)
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=stSidebar]"), "READY"))
    toggle = wait.until(
        ec.element_to_be_clickable((By.XPATH, "//label[.//*[contains(text(), 'Show what the model looked at')]]"))
    )
    toggle.click()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=stMain]"), "Class to explain"))
    uploader = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
    uploader.send_keys(str(image))

    heading = "ship.png: looks like none of" if expected["unknown"] else f"ship.png: {expected['pred_class']}"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=stMain]"), heading))
    wait.until(
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, "[data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg")
        )
    )
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[data-testid=stImage] img")))
    overlay_caption = f" for {expected['pred_class']}"  # "<method> for <class>"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=stMain]"), overlay_caption))
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=stImage] img")) == 2)
    overlay = browser.find_elements(By.CSS_SELECTOR, "[data-testid=stImage] img")[1]
    wait.until(lambda _: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    main = browser.find_element(By.CSS_SELECTOR, "[data-testid=stMain]").text
    assert "1 of 1 image(s) classified" in main and "round trip" in main
    confidence = f"{expected['probs'][expected['pred_class']]:.1%}"
    said = f"({confidence} among the classes)" if expected["unknown"] else f"{confidence} confident"
    assert said in main
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid=stAlertContentError], [data-testid=stException]")

    time.sleep(1)  # let Vega finish its first paint
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui_prediction.png"
    assert browser.save_screenshot(str(shot)), "screenshot failed"
    print(f"screenshot: {shot}")

    # An image of none of the classes beside it: said so, with its explanation and probabilities still shown.
    grey = tmp_path / "grey.png"
    Image.fromarray(class_images("grey", 1, seed=5, size=64)[0]).save(grey)
    uploader.send_keys(str(grey))
    said = "grey.png: looks like none of: airplane, automobile, ship"
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "[data-testid=stMain]"), said))
    main = browser.find_element(By.CSS_SELECTOR, "[data-testid=stMain]").text
    assert "above the server's threshold" in main and "closest class" in main
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=stVegaLiteChart]")
