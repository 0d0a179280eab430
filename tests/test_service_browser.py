"""A real browser against the running service: Debian's chromium, headless, driven by Playwright."""

from __future__ import annotations

import csv
import io
import os
import shutil
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from servers import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow

if CHROMIUM is None or not __import__("importlib").util.find_spec("playwright"):
    # CI installs chromium (.ci/run); a developer machine without it skips, CI never does.
    if os.environ.get("CI"):
        raise RuntimeError("CI must provide /usr/bin/chromium and playwright for the browser test")
    pytest.skip("chromium or playwright is not installed", allow_module_level=True)

# One item that is not square, in a colour no other item has, so its painted pixels can be measured.
BAR_SIZE = (32, 64)  # (width, height)
BAR_COLOUR = (240, 200, 0)


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
    bar = root / "images" / "yellow" / "bar.png"
    bar.parent.mkdir()
    Image.new("RGB", BAR_SIZE, BAR_COLOUR).save(bar)
    rows.append([str(bar), "a yellow bar", "yellow"])
    with open(root / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "label"], *rows])
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    model.save_pretrained(root / "model")
    options = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))
    build_index(root / "table.csv", root / "index", model, options=options, model_source=str(root / "model"))
    proc, url = start_server(root / "index")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def browser():
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
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the service, once it has shown the index's size (and built the filters)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(server)
    page.wait_for_function("document.getElementById('info').textContent.includes('items')")
    yield page
    context.close()


def _wait_for_images(page, selector: str) -> None:
    page.wait_for_function(
        f"[...document.querySelectorAll({selector!r})].length > 0 && "
        f"[...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth > 0)"
    )


def _painted_size(locator, colour: tuple[int, int, int]) -> tuple[int, int]:
    """Width and height of the pixels painted in `colour` inside the element: what the user sees, whatever
    the CSS did to the element's box (stretched, object-fit, cropped)."""
    shot = np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"), dtype=np.int16)
    # A blended pixel at an edge counts when it is less than half way from the colour to the light grey or
    # white behind it, so each edge is measured to within half a pixel.
    near = np.abs(shot - np.array(colour)).max(axis=-1) < 120
    rows, cols = np.nonzero(near)
    assert rows.size, "the item's colour is nowhere in the element"
    return int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)


def _assert_aspect(locator, what: str) -> None:
    width, height = _painted_size(locator, BAR_COLOUR)
    expected = height * BAR_SIZE[0] / BAR_SIZE[1]
    assert abs(width - expected) <= 1, f"{what}, {BAR_SIZE[0]}x{BAR_SIZE[1]} pixels, is painted {width}x{height}"


def test_type_a_query_and_see_thumbnails(page, tmp_path):
    page.locator("#grid").click()  # leave the (autofocused) box, then come back with "/"
    page.keyboard.press("/")
    page.keyboard.type("a red square")
    assert page.locator("#q").input_value() == "a red square"
    page.keyboard.press("Enter")
    page.wait_for_selector("#grid li img")
    _wait_for_images(page, "#grid img")
    count = page.locator("#grid li").count()
    assert count == 10
    assert "10 results" in page.locator("#status").text_content()
    page.screenshot(path=os.environ.get("VLM_SCREENSHOT") or str(tmp_path / "results.png"))
    page.locator("#grid li button.open").first.click()
    page.wait_for_selector("dialog[open] #detail-meta tr")
    assert "label" in page.locator("#detail-meta").text_content()


def test_images_keep_their_aspect_ratio(page):
    page.select_option("#filter-label", "yellow")
    page.fill("#q", "a yellow bar")
    page.locator("#q").press("Enter")
    _wait_for_images(page, "#grid img")
    assert page.locator("#grid li").count() == 1
    _assert_aspect(page.locator("#grid li img"), "the result thumbnail")
    cell = page.locator("#grid li button.open").bounding_box()
    assert abs(cell["width"] - cell["height"]) <= 1, f"a tall image made its cell {cell['width']}x{cell['height']}"
    page.locator("#grid li button.open").click()
    page.wait_for_selector("dialog[open] #detail-meta tr")
    _wait_for_images(page, "#detail-img")
    _assert_aspect(page.locator("#detail-img"), "the detail dialog's image")


def test_a_late_answer_does_not_replace_a_newer_search(page):
    def is_search(url: str) -> bool:
        return urlsplit(url).path == "/search"

    held = []

    def hold_the_first(route):
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route(is_search, hold_the_first)
    page.select_option("#filter-label", "red")
    page.fill("#q", "a square")
    with page.expect_request(lambda request: is_search(request.url)) as first:
        page.locator("#q").press("Enter")
    page.select_option("#filter-label", "blue")  # searches again, while the first search waits
    blue_results = (
        "document.querySelectorAll('#grid li').length === 3 && "
        "[...document.querySelectorAll('#grid .caption')].every(c => c.textContent === 'a blue square')"
    )
    page.wait_for_function(blue_results)
    # Now let the first answer through and give the page time to show it, had it kept listening.
    held[0].continue_()
    page.wait_for_timeout(500)
    assert page.evaluate(blue_results), "the first search's late answer replaced the second one's results"
    assert first.value.failure == "net::ERR_ABORTED", "the superseded search was not aborted"
    assert page.locator("#status.error").count() == 0, "the aborted search showed an error"
    assert page.locator("#status").text_content().startswith("3 results")


def test_search_by_image_then_more_like_this(page, tmp_path):
    query = tmp_path / "query.png"
    Image.new("RGB", BAR_SIZE, BAR_COLOUR).save(query)
    page.select_option("#filter-label", "yellow")
    page.set_input_files("#file", str(query))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('1 results for query.png')")
    assert page.locator("#grid .caption").text_content() == "a yellow bar"
    page.locator("#grid li button.open").click()
    page.wait_for_selector("dialog[open] #detail-meta tr")
    page.locator("#detail-like").click()
    page.wait_for_function("document.getElementById('status').textContent.startsWith('1 results for items like #')")
    assert not page.locator("#detail").evaluate("dialog => dialog.open")
