"""A real browser against the running service: Debian's chromium, headless, driven by Playwright."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from PIL import Image

import vlm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow

if CHROMIUM is None or not __import__("importlib").util.find_spec("playwright"):
    # CI installs chromium (.ci/run); a developer machine without it skips, CI never does.
    if os.environ.get("CI"):
        raise RuntimeError("CI must provide /usr/bin/chromium and playwright for the browser test")
    pytest.skip("chromium or playwright is not installed", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retrieval.build import BuildOptions, build_index
    from retrieval.embedding_job import EmbedOptions

    root = tmp_path_factory.mktemp("browser")
    rows = []
    for i, (name, colour) in enumerate([("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))] * 3):
        path = root / "images" / name / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), colour).save(path)
        rows.append([str(path), f"a {name} square", name])
    with open(root / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "label"], *rows])
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    model.save_pretrained(root / "model")
    options = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))
    build_index(root / "table.csv", root / "index", model, options=options, model_source=str(root / "model"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm", "serve", str(root / "index"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"vlm serve exited: {proc.stdout.read().decode()}")
            time.sleep(0.3)
    else:
        proc.kill()
        raise RuntimeError("vlm serve did not answer /health within 60 s")
    yield url
    proc.terminate()
    proc.wait(10)


def test_type_a_query_and_see_thumbnails(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server)
            page.wait_for_function("document.getElementById('info').textContent.includes('items')")
            page.locator("#grid").click()  # leave the (autofocused) box, then come back with "/"
            page.keyboard.press("/")
            page.keyboard.type("a red square")
            assert page.locator("#q").input_value() == "a red square"
            page.keyboard.press("Enter")
            page.wait_for_selector("#grid li img")
            page.wait_for_function(
                "[...document.querySelectorAll('#grid img')].length > 0 && "
                "[...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            count = page.locator("#grid li").count()
            assert count == 9
            assert "9 results" in page.locator("#status").text_content()
            page.screenshot(path=os.environ.get("VLM_SCREENSHOT") or str(tmp_path / "results.png"))
            page.locator("#grid li button.open").first.click()
            page.wait_for_selector("dialog[open] #detail-meta tr")
            assert "label" in page.locator("#detail-meta").text_content()
        finally:
            browser.close()
