"""The chat page in a real browser: Debian's headless Chromium, driven by Selenium through Debian's
chromedriver (explicit paths: nothing is downloaded), against a real server on loopback.

Two turns on a phone-sized screen, 412 CSS pixels wide (the second long enough that the oldest turn is
dropped, and the page says so), replies checked against what `nima-edge chat` answers, statistics
shown, the conversation kept across a reload, and the stop button cancelling a reply on the server.
Set NIMA_EDGE_SCREENSHOT to a path to keep the screenshot (docs/serve.png was made that way).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[gguf]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from serve_support import LiveServer, slowed, wait_for  # noqa: E402

from nima_edge.chat import Conversation  # noqa: E402
from nima_edge.export import export  # noqa: E402
from nima_edge.runtimes import load_runtime  # noqa: E402
from nima_edge.sampling import Sampling  # noqa: E402
from nima_edge.serve.app import Settings  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
PHONE = {"deviceMetrics": {"width": 412, "height": 860, "pixelRatio": 2, "touch": True}}  # a mid-size phone
SYSTEM = "Be brief."
FIRST = "Good morrow, my lord"
SECOND = "Speak, I pray thee, of the king and of the queen and of all their court, " * 2  # ~150 chars


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory, tiny_ckpt) -> Path:
    return export(tiny_ckpt, "gguf", tmp_path_factory.mktemp("browser") / "tiny.gguf", "q8_0")


@pytest.fixture(scope="module")
def server(model_gguf):
    from nima_edge.runtimes.gguf import LlamaCppRuntime
    live = LiveServer({"tiny": load_runtime(model_gguf),
                       "slow": slowed(LlamaCppRuntime, prefill_s=5.0)(model_gguf)},  # time to press Stop
                      Settings(allowed_hosts={"127.0.0.1", "localhost"}))
    yield live
    live.stop()


@pytest.fixture()
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium "
                    "chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_experimental_option("mobileEmulation", PHONE)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def greedy_reply(rt, history: list[dict], text: str, max_new: int) -> tuple[str, int]:
    convo = Conversation(rt, SYSTEM, max_new, Sampling(), history=[dict(m) for m in history])
    return "".join(convo.reply(text)), convo.dropped


def test_chat_page_in_chromium(server, browser, model_gguf, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    find = browser.find_element
    replies = lambda: browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant.done")

    browser.get(server.url + "/")
    wait.until(lambda d: len(Select(find(By.ID, "model")).options) == 2)
    info = find(By.ID, "model-info").get_attribute("textContent")  # hidden on a phone, to save room
    assert "gguf" in info and "256" in info
    find(By.ID, "toggle-settings").click()
    for field, value in (("system", SYSTEM), ("temperature", "0"), ("max_tokens", "100")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.ID, "toggle-settings").click()

    # turn 1: typed, sent with Enter, streamed into the page
    find(By.ID, "input").send_keys(FIRST, Keys.ENTER)
    wait.until(lambda d: len(replies()) == 1)
    rt = load_runtime(model_gguf)
    try:
        expected1, _ = greedy_reply(rt, [], FIRST, 100)
        first = replies()[0]
        assert first.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == expected1
        stats = first.find_element(By.CSS_SELECTOR, ".stats").text
        assert "tokens" in stats and "budget 100 ms" in stats

        # turn 2: long enough that turn 1 no longer fits beside it; the page says so
        find(By.ID, "input").send_keys(SECOND, Keys.ENTER)
        wait.until(lambda d: len(replies()) == 2)
        expected2, dropped = greedy_reply(rt, [{"role": "user", "content": FIRST},
                                               {"role": "assistant", "content": expected1}], SECOND, 100)
    finally:
        rt.close()
    second = replies()[1]
    assert dropped > 0
    assert second.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") == expected2
    assert f"{dropped} oldest message(s) left out" in second.find_element(By.CSS_SELECTOR, ".note").text
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # fits
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if keep := os.environ.get("NIMA_EDGE_SCREENSHOT"):
        shutil.copyfile(shot, keep)

    # the conversation survives a reload; New chat clears it
    browser.refresh()
    wait.until(lambda d: len(browser.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 4)
    find(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .msg")

    # Stop: the reply ends in the page and its generation is cancelled on the server
    wait.until(lambda d: len(Select(find(By.ID, "model")).options) == 2)
    Select(find(By.ID, "model")).select_by_value("slow")
    find(By.ID, "input").send_keys("Hello", Keys.ENTER)
    wait.until(lambda d: find(By.ID, "stop").is_displayed())
    wait_for(lambda: server.workers["slow"].busy, what="the slow model to start")
    find(By.ID, "stop").click()
    wait.until(lambda d: "stopped" in replies()[-1].text if replies() else False)
    wait_for(lambda: server.workers["slow"].stats["cancelled"] == 1, timeout=15, what="the server to cancel")
    assert find(By.ID, "send").is_displayed()

    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script errors, no blocked resources (CSP)
