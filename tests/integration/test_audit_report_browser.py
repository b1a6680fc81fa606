"""The audit's report.html in a real browser (headless Chromium through Selenium): it renders
with its title and every section, each embedded plot loads at its own size, and the console
has no errors. Skipped without chromium, chromedriver or selenium, unless
MEGEX_REQUIRE_BROWSER=1 (CI), where their absence is a failure."""

from __future__ import annotations

import base64
import os
import shutil
import struct
from pathlib import Path

import pytest
from audit_support import example_summary

from megex.experiments.audit.report import write_report

PLOTS = ("data-free", "with-images", "defenses-data-free")  # in the order the page shows them
HEADINGS = [
    "megex audit",
    "Answer",
    "Data-free attacker (no images of the domain)",
    "Attacker with 300 unlabelled images of the domain",
    "Clone accuracy",
    "Queries saved by the maps",
    "Settings",
    "Defences",
    "Data-free attacker (no images of the domain), at 10k queries",
    "Monitors",
    "Skipped",
    "Caveats",
    "Plan",
    "Victim",
]
# A string that would run, or retitle the page, were it not escaped.
HOSTILE = "victims/<script>document.title='owned'</script>digits.safetensors"

# What each image is, as the page has loaded it.
_IMAGES_JS = """
return Array.from(document.images).map(img => ({
  alt: img.alt, loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth}));
"""


def _tools() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip (a failure where the browser check is required)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    found = {"chromium": chromium, "chromedriver": chromedriver}
    missing = [name for name, path in found.items() if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install 'selenium>=4.15')")
    if missing:
        why = f"browser check needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("MEGEX_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return chromium, chromedriver


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = _tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager is never asked to find or download one.
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    summary = example_summary()
    summary["victim"]["source"] = HOSTILE
    out = tmp_path_factory.mktemp("audit")
    write_report(summary, out)
    return out


def _png_width(path: Path) -> int:
    # A PNG's width: the first 4 bytes of its IHDR chunk, after the 8-byte signature.
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def _image_problems(browser, widths: list[int]) -> list[str]:
    """Why the page's images are not what was embedded (none: each loaded at its width)."""
    images = browser.execute_script(_IMAGES_JS)
    if len(images) != len(widths):
        return [f"{len(images)} images on the page, {len(widths)} embedded"]
    return [
        f"{image['alt']!r}: loaded={image['loaded']}, width {image['width']} (PNG: {width})"
        for image, width in zip(images, widths)
        if not image["loaded"] or image["width"] != width
    ]


def _open(browser, page: Path) -> list[dict]:
    """Load `page`; the console entries it logged."""
    browser.get_log("browser")  # what earlier pages logged
    browser.get(page.as_uri())  # returns once the page, images included, has loaded
    return browser.get_log("browser")


def test_the_report_renders_with_its_plots_and_no_console_errors(driver, report):
    from selenium.webdriver.common.by import By

    log = _open(driver, report / "report.html")
    assert driver.title == "megex audit"
    text = driver.find_element(By.TAG_NAME, "body").text
    missing = [heading for heading in HEADINGS if heading not in text]
    assert missing == []
    headings = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "h1, h2, h3")]
    assert set(headings) == set(HEADINGS)
    assert HOSTILE in text  # shown as text, not run
    assert "+4.8 [4.0, 5.7]" in text
    widths = [_png_width(report / "plots" / f"{key}.png") for key in PLOTS]
    assert _image_problems(driver, widths) == []
    assert [entry for entry in log if entry["level"] == "SEVERE"] == []


def test_the_check_sees_an_image_that_does_not_load(driver, report):
    page = (report / "report.html").read_text()
    marker = "data:image/png;base64,"
    start = page.index(marker) + len(marker)
    # The first plot's PNG signature and header overwritten: the data no longer decodes.
    broken = page[:start] + base64.b64encode(b"not a png" * 4).decode() + page[start + 48 :]
    path = report / "broken.html"
    path.write_text(broken)
    _open(driver, path)
    widths = [_png_width(report / "plots" / f"{key}.png") for key in PLOTS]
    problems = _image_problems(driver, widths)
    assert len(problems) == 1 and "loaded=False" in problems[0]
    assert "Data-free" in problems[0]


def test_the_check_sees_a_console_error(driver, report):
    path = report / "console.html"
    path.write_text("<!DOCTYPE html><title>t</title><script>console.error('broken')</script>")
    log = _open(driver, path)
    assert any(e["level"] == "SEVERE" and "broken" in e["message"] for e in log)
