"""The web chat at ``/``, driven by headless Chromium (Debian's ``chromium`` + ``chromium-driver``) through
Selenium: type a message, send it, see a streamed answer with thinking, usage and cost."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from .conftest import API_KEY


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ("/v1/chat/completions", "stream: true", "include_usage", "reasoning_content", "createElement(\"details\")",
                   "tool_calls", "cost"):
        assert needle in html


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary, driver_path = _chromium(), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    try:
        drv = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    except Exception as e:  # noqa: BLE001 - e.g. a sandbox that cannot start Chromium
        pytest.skip(f"cannot start headless chromium: {e}")
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_browser_sends_and_streams(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "api_key").send_keys(API_KEY)
    browser.execute_script("document.getElementById('max_tokens').value = '24';")
    # count DOM updates of the conversation: a streamed answer arrives in many small updates
    browser.execute_script("""
        window.__updates = 0;
        new MutationObserver(() => { window.__updates++; })
            .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello from the browser")
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-state") == "done")
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
    assert not bubble.find_elements(By.CSS_SELECTOR, ".error"), bubble.text
    user = browser.find_element(By.CSS_SELECTOR, ".msg.user")
    assert user.text == "Hello from the browser"
    # thinking is on: the random model's tokens stream into the collapsed "Thinking" block
    details = bubble.find_element(By.TAG_NAME, "details")
    assert details.get_attribute("open") is None
    thinking = browser.execute_script("return arguments[0].querySelector('.thinking').textContent;", bubble)
    content = bubble.find_element(By.CSS_SELECTOR, ".content").text
    assert thinking or content
    assert browser.execute_script("return window.__updates;") >= 10  # not one blob at the end
    usage = bubble.find_element(By.CSS_SELECTOR, ".usage").text
    assert "completion tokens" in usage and "cost $" in usage
    browser.save_screenshot(str(tmp_path / "webchat.png"))

    # a second turn, thinking off: the answer goes to the visible content
    browser.find_element(By.ID, "thinking").click()
    browser.find_element(By.ID, "input").send_keys("Second message")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
               and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1].get_attribute("data-state") == "done")
    second = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]
    assert not second.find_elements(By.CSS_SELECTOR, ".error"), second.text
    assert "cost $" in second.find_element(By.CSS_SELECTOR, ".usage").text


def test_browser_shows_thinking_content_and_tool_calls(scripted_server, browser):
    """Known model output (ScriptedBackend, TEST-ONLY: the real engine forced to a scripted token sequence):
    the page shows the reasoning collapsed, the answer, and a tool call with its arguments."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .test_parsing import TOOLS

    browser.get(scripted_server.url + "/")
    wait = WebDriverWait(browser, 60)

    def send(text):
        n = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
        browser.find_element(By.ID, "input").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == n + 1
                   and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n].get_attribute("data-state") == "done")
        return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[n]

    bubble = send("SCRIPT:reason")
    assert bubble.find_element(By.CSS_SELECTOR, ".content").text == "Hello! How can I help?"
    details = bubble.find_element(By.TAG_NAME, "details")
    assert details.get_attribute("open") is None and details.is_displayed()
    details.find_element(By.TAG_NAME, "summary").click()  # expand the thinking
    assert bubble.find_element(By.CSS_SELECTOR, ".thinking").text == "The user greets me. I should greet back."

    browser.execute_script("document.getElementById('tools').value = arguments[0];", json.dumps(TOOLS))
    bubble = send("SCRIPT:tool")
    tool = bubble.find_element(By.CSS_SELECTOR, ".tool").text
    assert tool.startswith("tool call: get_weather(")
    assert json.loads(tool[len("tool call: get_weather("):-1]) == {"location": "Beijing", "days": 3}
    assert "finish: tool_calls" in bubble.find_element(By.CSS_SELECTOR, ".usage").text
