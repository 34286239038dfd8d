"""Headless Chromium for the web-page tests; importing this skips the importing module without it."""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    # .ci/run installs Debian's chromium and chromium-driver and sets this, so CI never skips.
    if os.environ.get("CHATGATE_REQUIRE_BROWSER"):
        raise RuntimeError(
            "chromium and chromedriver are required (apt-get install chromium chromium-driver)"
        )
    pytest.skip("chromium or chromedriver is not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only importable where the browser tests run
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

__all__ = ["By", "WebDriverWait", "blocked_by_policy", "browser", "expected_conditions"]


def browser() -> webdriver.Chrome:
    """A headless Chromium; quit it when done."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for blocked_by_policy
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def blocked_by_policy(driver: webdriver.Chrome) -> list[str]:
    """What the page's Content-Security-Policy refused so far (Chromium logs each refusal)."""
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
