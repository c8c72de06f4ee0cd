"""The viewer in a real browser: `scripts/serve.py` on localhost with a tiny random model, driven by
Selenium in headless Chromium (Debian's `chromium` and `chromium-driver`; scripts/test.sh installs them).

One server for the module: the page loads; a phantom and a question give an answer and one bar per
slice, a click on a bar shows that slice, and a screenshot of the answered page is written (to
$MED2E3_TEST_ARTIFACTS when set, else pytest's temporary folder); a corrupt `.nii.gz` shows the
reader's error and a good upload still works; two users asking at once both get answers; no file
outside the server's folder can be fetched; stopping the server removes its folder.
"""

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("gradio", reason="the viewer needs gradio: pip install '.[serve]'")
pytest.importorskip("selenium", reason="the browser tests need selenium (the test extras)")
from flax import nnx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import tiny  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from data_pipelines.assets import AssetError, asset_path  # noqa: E402
from med2e3_jax.checkpoint.orbax_params import save_params  # noqa: E402
from med2e3_jax.models.med2e3 import Med2E3  # noqa: E402

SLICES = 32
STARTUP_S = 300  # import, restore, compile on a loaded 2-core machine
ANSWER_S = 120


def _browser_paths() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no headless Chromium: apt-get install chromium chromium-driver (scripts/test.sh does)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """scripts/serve.py in a subprocess; `lines` collects its output."""

    def __init__(self, command, env):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=ROOT)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_ready(self, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if match := re.search(r"med2e3-serve: open (http://\S+) \(private folder (.+)\)", line):
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not start:\n{''.join(self.lines)[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@pytest.fixture(scope="module")
def browser_paths():
    return _browser_paths()


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser_paths):
    try:
        tokenizers = asset_path("tokenizers/phi3"), asset_path("minilm")
    except AssetError as error:
        pytest.skip(f"tokenizer assets not fetched: {error}")
    folder = tmp_path_factory.mktemp("serve")
    save_params(Med2E3(tiny.tiny_model(), rngs=nnx.Rngs(0)), folder / "model")
    port = _free_port()
    command = [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--checkpoint={folder / 'model'}",
               f"--tokenizer={tokenizers[0]}", f"--question_tokenizer={tokenizers[1]}", f"--port={port}",
               "--max_new_tokens=6", "--phantoms=2", "--max_upload_mb=4"]
    server = Server(command, {**os.environ, "JAX_PLATFORMS": "cpu"})
    match = server.wait_ready(STARTUP_S)
    server.url, server.private = match.group(1), pathlib.Path(match.group(2))
    server.folder = folder
    yield server
    server.stop()


def _driver(browser_paths):
    browser, chromedriver = browser_paths
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(service=Service(chromedriver), options=options)
    except WebDriverException as error:
        pytest.skip(f"headless Chromium does not start here: {error.msg}")


@pytest.fixture(scope="module")
def driver(browser_paths, server):
    driver = _driver(browser_paths)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = os.environ.get("MED2E3_TEST_ARTIFACTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        return pathlib.Path(folder)
    return tmp_path_factory.mktemp("artifacts")


def _wait(driver, condition, timeout=60, message=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition(d), message)


def _open(driver, server):
    driver.get(server.url)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#embedded input"), message="the page did not load")


def _status(driver) -> str:
    return driver.find_element(By.ID, "scan-status").text


def _options(driver):
    """The embedded scans' dropdown options, opening the dropdown (again, until the page has hydrated)."""
    options = driver.find_elements(By.CSS_SELECTOR, "#embedded [role=option]")
    if not options:
        driver.find_element(By.CSS_SELECTOR, "#embedded input").click()
    return options


def _pick(driver, label_start: str) -> str:
    options = _wait(driver, lambda d: [o for o in _options(d) if o.get_attribute("aria-label").startswith(label_start)],
                    message="no such embedded scan")
    label = options[0].get_attribute("aria-label")
    options[0].click()
    _wait(driver, lambda d: _status(d).startswith(label), message=f"{label} did not load")
    return label


def _ask(driver, questions: str):
    box = driver.find_element(By.CSS_SELECTOR, "#questions textarea")
    box.clear()
    box.send_keys(questions)
    driver.find_element(By.ID, "ask").click()


def _wait_answers(driver, count: int):
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#answers .answer.done")) == count, ANSWER_S,
          "the answers did not arrive")
    return [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#answers .answer.done")]


def _upload(driver, path: pathlib.Path):
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def test_the_page_loads_with_the_embedded_scans(driver, server):
    _open(driver, server)
    assert driver.title == "Med-2E3 viewer"
    labels = [o.get_attribute("aria-label") for o in _wait(driver, _options, message="the dropdown lists no scan")]
    assert [label for label in labels if label.startswith("phantom")] == labels[:2] and len(labels) >= 2
    for element in ("axial", "coronal", "sagittal", "questions", "ask", "window"):
        assert driver.find_element(By.ID, element).is_displayed()


def test_a_phantom_and_a_question_give_an_answer_and_one_bar_per_slice(driver, server, artifacts):
    _open(driver, server)
    _pick(driver, "phantom")
    _ask(driver, "Which organ shows a lesion?")
    (answer,) = _wait_answers(driver, 1)
    assert "Q1: Which organ shows a lesion?" in answer and "first token" in answer
    assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .slice-bar")) == SLICES
    # A click on a bar shows that slice: the axial slider moves and the bar's row is marked.
    driver.find_elements(By.CSS_SELECTOR, "#bars [data-slice]")[5].click()
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#axial-slider input[type=number]")
          .get_attribute("value") == "5", message="the click on bar 5 did not move the axial slider")
    _wait(driver, lambda d: [r.get_attribute("data-slice") for r in
                             d.find_elements(By.CSS_SELECTOR, "#bars .bars-row.current")] == ["5"])
    # The downloads are offered.
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#download-answers").is_enabled())
    screenshot = artifacts / "serve_answered.png"
    driver.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_a_corrupt_upload_shows_the_error_and_a_good_upload_then_works(driver, server):
    _open(driver, server)
    broken = server.folder / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(4000))
    _upload(driver, broken)
    _wait(driver, lambda d: "broken.nii.gz" in _status(d), message="the reader's error did not show")
    status = driver.find_element(By.CSS_SELECTOR, "#scan-status .scan-status")
    assert "error" in status.get_attribute("class") and str(server.private) not in status.text

    synthetic.generate(server.folder / "data", num=1, seed=5, shape=(32, 64, 64), formats=("nifti",))
    (good,) = (server.folder / "data" / "nifti").glob("*.nii.gz")
    _upload(driver, good)
    _wait(driver, lambda d: _status(d).startswith(good.name), message="the good upload did not load")
    _ask(driver, "Is there a lesion in the liver?")
    _wait_answers(driver, 1)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .slice-bar")) == SLICES
    uploads = [p for p in server.private.rglob("*.nii.gz") if "embedded" not in p.parts]
    assert uploads == []  # removed once read


def test_two_users_asking_at_once_both_get_answers(driver, server, browser_paths):
    other = _driver(browser_paths)
    try:
        for page in (driver, other):
            _open(page, server)
            _pick(page, "phantom")
        _ask(driver, "Which organ shows a lesion?\nIs the liver normal?")
        _ask(other, "Where is the heart?")
        assert len(_wait_answers(driver, 2)) == 2
        assert len(_wait_answers(other, 1)) == 1
        assert len(other.find_elements(By.CSS_SELECTOR, "#bars .slice-bar")) == SLICES
        assert len(driver.find_elements(By.CSS_SELECTOR, "#bars .slice-bar")) == 2 * SLICES
    finally:
        other.quit()


def _status_code(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_no_file_outside_the_servers_folder_can_be_fetched(server):
    for path in ("/etc/passwd", str(server.folder / "model" / "model_config.json"), str(ROOT / "setup.py")):
        code = _status_code(f"{server.url}/gradio_api/file={urllib.parse.quote(path)}")
        assert code in (403, 404), f"{path}: HTTP {code}"
    assert server.url.startswith("http://127.0.0.1:")


def test_stopping_the_server_removes_its_private_folder(server):
    assert server.private.is_dir()
    assert server.stop() == 0, "".join(server.lines)[-3000:]
    assert not server.private.exists()
