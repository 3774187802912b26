"""The search page end to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a real server on loopback: enrol, query, the grid in score order, an overlay toggle, a delete, the
API-key prompt. A screenshot is saved to test-artifacts/web_page.png."""

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import person_image
from harness.server import REPO, ServiceProcess

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NEEDS_BROWSER = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver: make browser"
)
pytestmark = [pytest.mark.slow, NEEDS_BROWSER]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def browser():
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def strip_maps_drawn(driver) -> bool:
    """Every small map beside a RAM (parts, pairs) drawn by the page from the answer's grids."""
    from selenium.webdriver.common.by import By

    overlays = driver.find_elements(By.CSS_SELECTOR, ".strip img.overlay")
    return all(i.get_attribute("src").startswith("data:image/png") for i in overlays)


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def query_on_page(browser, server: ServiceProcess, image: Path, *checkboxes: str) -> list:
    """Open the page, pick ``image`` as the query, click the checkboxes with these ids, search: the match cards."""
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait_for(browser, lambda d: "branches" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "query-file").send_keys(str(image))
    for checkbox in checkboxes:
        browser.find_element(By.ID, checkbox).click()
    browser.find_element(By.CSS_SELECTOR, "#query-form button").click()
    wait_for(browser, lambda d: "matches from" in d.find_element(By.ID, "query-status").text)
    return browser.find_elements(By.CSS_SELECTOR, "#matches .card")


def pictures(tmp_path: Path, pid: int, count: int) -> list:
    paths = []
    for i in range(count):
        path = tmp_path / f"{pid}_{i}.png"
        person_image(pid, i, size=(40, 80)).save(path)
        paths.append(str(path))
    return paths


def test_enrol_query_toggle_and_delete(browser, tiny_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3") as server:
        browser.get(server.url + "/")
        wait_for(browser, lambda d: "branches" in d.find_element(By.ID, "model-info").text)
        assert "CPUExecutionProvider" in browser.find_element(By.ID, "model-info").text

        for pid, camera in ((7, "c1"), (8, "c2")):
            browser.find_element(By.ID, "enroll-files").send_keys("\n".join(pictures(tmp_path, pid, 3)))
            browser.find_element(By.ID, "enroll-person").send_keys(str(pid))
            browser.find_element(By.ID, "enroll-camera").send_keys(camera)
            browser.find_element(By.CSS_SELECTOR, "#enroll-form button").click()
            wait_for(browser, lambda d: "enrolled 3" in d.find_element(By.ID, "enroll-status").text)
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .gallery-item")) == 6)

        browser.find_element(By.ID, "query-file").send_keys(pictures(tmp_path, 7, 1)[0])
        browser.find_element(By.ID, "query-person").send_keys("7")
        browser.find_element(By.CSS_SELECTOR, "#query-form button").click()
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches .card")) == 6)
        cards = browser.find_elements(By.CSS_SELECTOR, "#matches .card")
        scores = [float(c.get_attribute("data-score")) for c in cards]
        assert scores == sorted(scores, reverse=True)
        assert [int(c.get_attribute("data-rank")) for c in cards] == list(range(1, 7))
        assert cards[0].get_attribute("class").count("same-person") == 1  # the identical image, person 7
        assert len(browser.find_elements(By.CSS_SELECTOR, "#matches .same-person")) == 3
        assert not browser.find_element(By.ID, "query-card").get_attribute("hidden")
        assert "its own heatmap" in browser.find_element(By.CSS_SELECTOR, "#query-card figcaption").text
        assert "adds most to the score" in browser.find_element(By.ID, "heatmap-legend").text
        assert cards[0].find_element(By.CSS_SELECTOR, ".badge").text == "same id"
        icon = browser.execute_script("return document.querySelector('link[rel=icon]').href")
        with server.client() as client:
            assert client.get(icon.removeprefix(server.url)).status_code == 200

        overlay = cards[0].find_element(By.CSS_SELECTOR, "img.overlay")
        wait_for(browser, lambda d: overlay.get_attribute("src").startswith("data:image/png;base64,"))
        assert float(overlay.value_of_css_property("opacity")) > 0
        # the page draws the map from the answer's grid (it asks for no PNG), in the image's own proportions,
        # so that it lies exactly over the image
        sizes = browser.execute_script(
            "const [base, heat] = arguments[0].querySelectorAll('.stack img');"
            "return [base.naturalWidth, base.naturalHeight, heat.naturalWidth, heat.naturalHeight];",
            cards[0],
        )
        assert abs(sizes[0] / sizes[1] - sizes[2] / sizes[3]) < 0.02, sizes
        cards[0].find_element(By.CSS_SELECTOR, ".toggle-overlay").click()
        wait_for(browser, lambda d: float(overlay.value_of_css_property("opacity")) == 0)
        cards[0].find_element(By.CSS_SELECTOR, ".toggle-overlay").click()
        wait_for(browser, lambda d: float(overlay.value_of_css_property("opacity")) > 0)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "web_page.png"))

        # a track of two images of person 7, best-of, then one match per person
        browser.execute_script(
            "document.getElementById('query-file').value = ''"
        )  # a multiple input adds to what it holds
        browser.find_element(By.ID, "query-file").send_keys("\n".join(pictures(tmp_path, 7, 2)))
        Select(browser.find_element(By.ID, "aggregate")).select_by_value("best")
        browser.find_element(By.CSS_SELECTOR, "#query-form button").click()
        wait_for(browser, lambda d: "for a track of 2" in d.find_element(By.ID, "query-status").text)
        assert "(best)" in browser.find_element(By.CSS_SELECTOR, "#query-card figcaption").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#matches .same-person")) == 3
        browser.find_element(By.ID, "group-by-person").click()
        browser.find_element(By.CSS_SELECTOR, "#query-form button").click()
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches .card")) == 2)

        first = browser.find_element(By.CSS_SELECTOR, "#gallery .gallery-item")
        doomed = first.get_attribute("data-id")
        listed = "return [...document.querySelectorAll('#gallery .gallery-item')].map(e => e.dataset.id)"
        first.find_element(By.CSS_SELECTOR, ".delete").click()
        assert doomed in browser.switch_to.alert.text
        browser.switch_to.alert.dismiss()  # a delete asks first: dismissed, nothing is deleted
        assert doomed in browser.execute_script(listed)
        first.find_element(By.CSS_SELECTOR, ".delete").click()
        browser.switch_to.alert.accept()
        wait_for(browser, lambda d: len(d.execute_script(listed)) == 5 and doomed not in d.execute_script(listed))
        with server.client() as client:
            assert client.get(f"/gallery/{doomed}").status_code == 404


def test_the_page_asks_for_the_api_key_once(browser, tiny_model, tmp_path):
    from selenium.webdriver.common.by import By

    with ServiceProcess(tiny_model[1], tmp_path / "g.sqlite3", api_key="let-me-in") as server:
        browser.get(server.url + "/")
        wait_for(browser, lambda d: d.find_element(By.ID, "key-dialog").is_displayed())
        browser.find_element(By.ID, "key-input").send_keys("let-me-in")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait_for(browser, lambda d: "branches" in d.find_element(By.ID, "model-info").text)
        assert not browser.find_element(By.ID, "key-dialog").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('reid-api-key')") == "let-me-in"
        assert browser.execute_script("return localStorage.length") == 0
