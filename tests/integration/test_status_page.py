"""The live status page at `/`, in headless Chromium: it loads, shows the demo's models, and follows the load.

Chromium is Debian's `chromium` package (`make install` puts it there); playwright drives it without
downloading a browser of its own.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc

from live_server import ServerProcess, start_server
from tidal.demo import ensure_demo_repository

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    srv = start_server(ensure_demo_repository(progress=False))
    yield srv
    assert srv.stop() == 0


def _browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make install` installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    return playwright.sync_playwright()


def _load(client: tc.InferenceServerClient, stop: threading.Event) -> None:
    x = np.ones((1, 16), np.float32)
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    while not stop.is_set():
        client.infer("add_sub", inputs)


def test_page_shows_the_demo_models_and_follows_the_load(demo: ServerProcess) -> None:
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(req.url))
            page.goto(f"http://{demo.http_url}/")
            page.wait_for_selector("section[data-model='add_sub']")
            page.wait_for_selector("section[data-model='digits']")
            arrivals = "section[data-model='add_sub'] [data-field='arrivals /s'] .v"
            assert page.inner_text(arrivals) in ("0", "-")
            stop = threading.Event()
            worker = threading.Thread(target=_load, args=(tc.InferenceServerClient(demo.url), stop))
            worker.start()
            try:
                # The page refreshes itself: without reloading it, the arrival rate it shows becomes non-zero.
                page.wait_for_function(
                    f"Number(document.querySelector(\"{arrivals}\").textContent) > 0", timeout=60_000
                )
            finally:
                stop.set()
                worker.join()
            assert "SLO p99 ms" in page.inner_text("section[data-model='add_sub']")
            assert not errors, errors
        finally:
            browser.close()
