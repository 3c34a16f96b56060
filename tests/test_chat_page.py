"""The chat page at / in headless Chromium (Debian's chromium + chromedriver, via Selenium):
type a message, watch the reply stream in, and check it against generate().

Skipped, with the reason, where no browser is installed; .ci/run installs one.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

sys.path.insert(0, str(Path(__file__).parent))
from scratchlm.chat import chat_stops, render_chat  # noqa: E402
from scratchlm.generate import generate  # noqa: E402
from scratchlm.serve import create_app  # noqa: E402
from serve_fixtures import ServerThread, slowed_down, tiny_model_and_tokenizer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no browser: install Debian's chromium and chromium-driver to run the chat page test"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scratchlm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_server():
    """The trained tiny model, slowed a little so the reply visibly arrives piece by piece."""
    model, tokenizer = tiny_model_and_tokenizer()
    with ServerThread(create_app(slowed_down(model, 0.005), tokenizer, "tiny")) as url:
        yield url, model, tokenizer


def greedy_reply(model, tokenizer, messages, max_tokens):
    stop_strings, stop_ids = chat_stops(None, tokenizer)
    return generate(model, tokenizer, render_chat(messages, None, tokenizer), max_new_tokens=max_tokens,
                    stop=stop_strings, stop_token_ids=stop_ids)[0].text


def send_and_wait(driver, text):
    """Type ``text``, press Send, wait for the reply to finish; return the assistant bubble."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before
               or d.find_elements(By.CSS_SELECTOR, ".message.error"))
    assert not driver.find_elements(By.CSS_SELECTOR, ".message.error"), driver.find_element(
        By.CSS_SELECTOR, ".message.error").text
    bubble = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    wait.until(lambda d: bubble.get_attribute("data-done") == "true")
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle"
    return bubble


def test_chat_page_streams_a_reply_equal_to_generate(browser, page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, model, tokenizer = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 15).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    for field, value in (("temperature", "0"), ("max-tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)

    bubble = send_and_wait(browser, "Hello, world!")
    first = [{"role": "user", "content": "Hello, world!"}]
    reply = greedy_reply(model, tokenizer, first, 40)
    assert reply.strip()
    # textContent, not .text: Selenium's .text collapses whitespace the page keeps.
    assert bubble.get_attribute("textContent") == reply
    assert int(bubble.get_attribute("data-chunks")) > 3  # it arrived in pieces, as they were made
    user = browser.find_elements(By.CSS_SELECTOR, ".message.user")
    assert [u.get_attribute("textContent") for u in user] == ["Hello, world!"]

    # The second turn carries the history: the reply continues the whole conversation.
    bubble = send_and_wait(browser, "A model")
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "A model"}]
    assert bubble.get_attribute("textContent") == greedy_reply(model, tokenizer, second, 40)

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []


def test_chat_page_shows_errors(browser, page_server):
    """A request the server refuses (max tokens past the context) shows its error message."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = page_server
    browser.get(url + "/")
    WebDriverWait(browser, 15).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys("100000")
    browser.find_element(By.ID, "prompt").send_keys("Hello")
    browser.find_element(By.ID, "send").click()
    error = WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error"))
    assert "maximum context length" in error[0].text
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "error"
    assert browser.find_element(By.ID, "send").is_enabled()  # ready to try again
