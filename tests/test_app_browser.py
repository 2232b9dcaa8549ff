"""The retrieval page in a real headless browser: Debian's ``chromium`` driven by Playwright.

``python app.py`` (no arguments: the demo's checkpoint and gallery, here a short training run laid out as
``demo_output/``) is started on 127.0.0.1 and a free port; the browser picks an example reference,
types its modification, searches, and reads the ranked results off the page.  Playwright drives the
system browser (``executable_path``); nothing is downloaded (no ``playwright install``).  Skipped when
chromium or the playwright package is missing (``.ci/run`` installs chromium with apt-get).

``APP_SCREENSHOT=docs/images/app.png python -m pytest tests/test_app_browser.py`` also writes the
README's screenshot of the page.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_SECONDS = 300  # importing torch + Gradio and loading the model on a busy 2-core machine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason="chromium is not installed (apt-get install -y chromium; .ci/run does this)"),
]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed (pip install -r requirements-test.txt)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python app.py --port P`` run from the folder holding ``demo_output/``; yields the page's URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--num_examples", "8"],
                                   cwd=app_demo_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not serve {url} within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser: object, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="load")
    page.locator("#search").wait_for()
    return page


def _example_rows(page) -> list[tuple[str, str]]:
    """(reference image name, modification) of each example query the page offers."""
    page.locator('#examples [data-testid="dataset-cell-0-0"] img').wait_for()  # the table renders after the form
    rows = []
    for i in range(page.locator('#examples [data-testid^="dataset-cell-"][data-testid$="-0"]').count()):
        source = page.locator(f'#examples [data-testid="dataset-cell-{i}-0"] img').get_attribute("src")
        rows.append((Path(source.split("?")[0]).stem, page.locator(f'#examples [data-testid="dataset-cell-{i}-1"]')
                     .inner_text().strip()))
    return rows


def test_pick_type_search_finds_the_target(browser: object, server: str, app_validation_rankings,
                                           tmp_path: Path) -> None:
    task, rankings = app_validation_rankings
    page = _open(browser, server)
    examples = _example_rows(page)
    assert len(examples) == 8
    queries = {(q.reference, q.caption): q for q in task.queries}
    offered = [queries[example] for example in examples]  # every example is a query of the val split
    # A query the trained model ranks right (validation's ranking, reference left out); preferably one the
    # baselines miss, then a circle edit ("make the circle blue").
    right = [i for i, q in enumerate(offered) if rankings["ssn"][q.query_id][0] == q.target]
    assert right, f"the test checkpoint ranks none of the page's examples right: {examples}"
    row = min(right, key=lambda i: (sum(ranking[offered[i].query_id][0] == offered[i].target
                                        for ranking in rankings.values()), "circle" not in offered[i].caption))
    query = offered[row]

    page.locator(f'#examples [data-testid="dataset-cell-{row}-0"]').click()
    page.locator("#reference img").first.wait_for()
    box = page.locator("#modification textarea")
    box.fill("")
    box.press_sequentially(query.caption)
    page.locator("#search").click()
    first = page.locator('#results [data-method="ssn"] figure[data-rank="1"]')
    first.wait_for()

    assert first.get_attribute("data-name") == query.target
    assert "gt" in first.get_attribute("class").split()  # framed green as the ground truth
    methods = page.locator("#results [data-method]")
    assert [methods.nth(i).get_attribute("data-method") for i in range(methods.count())] == list(rankings)
    for method, ranking in rankings.items():  # top-5 (the default top-k) of every method, in validation's order
        shown = page.locator(f'#results [data-method="{method}"] figure')
        names = [shown.nth(i).get_attribute("data-name") for i in range(shown.count())]
        assert names == ranking[query.query_id][:5], method
    words = page.locator("#words .word")
    assert [words.nth(i).get_attribute("data-word") for i in range(words.count())] == query.caption.split()
    assert query.target in page.locator("#message").inner_text()

    page.evaluate("window.scrollTo(0, 0)")
    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 20_000
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["APP_SCREENSHOT"])
    page.close()


def test_bad_input_shows_a_message(browser: object, server: str, tmp_path: Path) -> None:
    page = _open(browser, server)
    message = page.locator("#message")
    page.locator("#search").click()
    page.get_by_text("pick or upload a reference image").wait_for()

    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not pixels")
    page.locator("#reference input[type=file]").set_input_files(str(not_image))
    page.locator("#modification textarea").fill("make the circle blue")
    page.locator("#search").click()
    page.get_by_text("notes.png: not an image file").wait_for()
    assert "Cannot search" in message.inner_text()
    assert page.locator("#results figure").count() == 0
    page.close()
