"""The README's picture: the web page answering a real query with the shipped model.

Starts the service on a fresh store, enrols a Market-layout gallery (bounding_box_test) through the API with
person and camera ids from the file names, asks one query in headless Chromium and saves a screenshot of the
query panel. The query is the folder's first by name unless ``--query`` names one, so the picture is not chosen
by how well the model does on it. Research-licensed data may appear in the README only as such a small
illustration.

    python -m bench.readme_figure $DATA/cuhk03-detected --output docs/query_result.png
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from model_zoo import DEFAULT_MODEL_PATH
from harness.server import ServiceProcess
from training.data.market import read_split


def enrol_gallery(client, root: Path) -> int:
    records, _ = read_split(root / "bounding_box_test")
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        files = [("images", (r.path.name, r.path.read_bytes(), "image/jpeg")) for r in chunk]
        data = {"person_id": [str(r.pid) for r in chunk], "camera_id": [f"c{r.camid}" for r in chunk]}
        client.post("/gallery", files=files, data=data).raise_for_status()
    return len(records)


def screenshot(url: str, query: Path, person: str, top_k: int, output: Path) -> None:
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--window-size=1000,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: "branches" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "query-file").send_keys(str(query.resolve()))  # the browser needs an absolute path
        driver.find_element(By.ID, "query-person").send_keys(person)
        top = driver.find_element(By.ID, "top-k")
        top.clear()
        top.send_keys(str(top_k))
        driver.find_element(By.CSS_SELECTOR, "#query-form button").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches .card")) == top_k)
        time.sleep(1)
        driver.find_element(By.ID, "query-panel").screenshot(str(output))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", type=Path, help="Market-layout folder")
    parser.add_argument("--query", default=None, help="file name in data_root/query (default: the first by name)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="ONNX model")
    parser.add_argument("--top-k", type=int, default=10, help="matches to show")
    parser.add_argument("--output", type=Path, default=Path("docs/query_result.png"), help="PNG to write")
    args = parser.parse_args()
    query = args.query or min(path.name for path in (args.data_root / "query").glob("*.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        with ServiceProcess(args.model, Path(tmp) / "g.sqlite3") as server, server.client() as client:
            print("enrolled", enrol_gallery(client, args.data_root))
            screenshot(server.url, args.data_root / "query" / query, query.split("_")[0], args.top_k, args.output)
    print(args.output)


if __name__ == "__main__":
    main()
