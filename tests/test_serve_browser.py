"""The web page in a real browser: Debian's headless Chromium driven by selenium through chromium-driver.

The page is served by `cliprec serve`'s app (uvicorn in a thread) over the tiny project of test_recommend,
made a DVC project holding this repository's committed metrics, so that the plots section has real plots,
with a copy of its category under a second name, so that the page has a category to switch to.
Chromium's network log must show no request outside the server (nothing from a CDN).

Screenshots go to $CLIPREC_SCREENSHOTS (default: a temp dir). docs/serving.md's screenshot comes from the demo
project itself: after `dvc repro`,

    CLIPREC_BROWSER_ROOT=. CLIPREC_SCREENSHOTS=docs pytest tests/test_serve_browser.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import CAT, build_category, listening_socket, shared_project, wait_healthy
from PIL import Image

from cliprec.serve import ServeSettings, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _major(program: str | None) -> str | None:
    """The major version `program --version` prints (Chromium 156.0... / ChromeDriver 156.0...)."""
    if program is None:
        return None
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = [w for w in out.split() if w[:1].isdigit()]
    return words[0].split(".")[0] if words else None


def _skip_reason() -> str | None:
    if not (CHROMIUM and CHROMEDRIVER):
        return (
            "needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver "
            "(.ci/run installs them)"
        )
    browser, driver = _major(CHROMIUM), _major(CHROMEDRIVER)
    if browser is None or browser != driver:
        return f"{CHROMIUM} is version {browser} but {CHROMEDRIVER} is {driver}: install matching ones"
    return None


SKIP = _skip_reason()
# slow: the fixtures build a second category and start Chromium (~20 s here), the module takes a minute
pytestmark = [pytest.mark.skipif(SKIP is not None, reason=SKIP or ""), pytest.mark.slow]
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
WAIT_S = 60
OTHER = "Appliances"  # the fixture's second category: built like CAT (the same product ids)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("CLIPREC_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[str]]:
    """(root, categories): $CLIPREC_BROWSER_ROOT with its categories, or a DVC copy of the tiny project."""
    if os.environ.get("CLIPREC_BROWSER_ROOT"):
        from cliprec.service import configured_categories

        root = Path(os.environ["CLIPREC_BROWSER_ROOT"]).resolve()
        return root, configured_categories(root)
    root = tmp_path_factory.mktemp("browser") / "project"
    shutil.copytree(shared_project(tmp_path_factory), root)
    # built, not copied: the service refuses artefacts whose manifests name another category
    build_category(root, OTHER, n=32)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "metrics", root / "metrics", dirs_exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    return root, [CAT, OTHER]


@pytest.fixture(scope="module")
def server(project):
    import uvicorn

    root, categories = project
    app = create_app(root, categories=categories, settings=ServeSettings(max_upload_bytes=2_000_000))
    sock = listening_socket()  # bound here and handed over: no window in which another process takes it
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_healthy(url, WAIT_S, 0.1)
    yield url
    srv.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


def httpx_get_json(url: str):
    import httpx

    return httpx.get(url).json()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith("ready"), "page ready")


def set_query(driver, text: str) -> None:
    """Type text into the query box (through JavaScript: chromedriver's keys cannot send every character)."""
    box = driver.find_element(By.ID, "text")
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));", box, text
    )


def search_and_wait(driver, what: str) -> str:
    """Press Search; the summary once the answer is on the page."""
    driver.find_element(By.ID, "search-btn").click()
    summary = driver.find_element(By.ID, "summary")
    wait(driver, lambda d: " ms" in summary.text, what)
    return summary.text


# The left edge, in the rendered page, of the first occurrence of a string in an element's text: where the
# browser drew it, which is what a bidi override changes.
TEXT_X = """
const [root, needle] = arguments;
const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const at = node.data.indexOf(needle);
  if (at < 0) continue;
  const range = document.createRange();
  range.setStart(node, at);
  range.setEnd(node, at + needle.length);
  return range.getBoundingClientRect().left;
}
return null;
"""


def hit_ids(driver, variant: str) -> list[str]:
    return [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, f"#col-{variant} .hit")]


def ink(png: bytes) -> float:
    """Fraction of the picture's pixels that are not (nearly) white."""
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return float((grey < 200).mean())


def network_requests(driver) -> list[str]:
    """Every http(s)/ws URL the browser asked for since the last call (Chromium's DevTools log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))]


def test_search_upload_and_more_like_this(server, project, driver, shots, tmp_path):
    import httpx

    category = project[1][0]
    open_page(driver, server)

    # a text query: both columns fill, and the products both variants found are marked
    box = driver.find_element(By.ID, "text")
    box.send_keys("a red shirt", Keys.ENTER)
    wait(driver, lambda d: len(hit_ids(d, "lora")) == 10 and len(hit_ids(d, "zeroshot")) == 10, "results")
    api = httpx.post(f"{server}/api/search", data={"text": "a red shirt", "category": category}).json()
    assert hit_ids(driver, "lora") == [h["id"] for h in api["results"]["lora"]]
    assert hit_ids(driver, "zeroshot") == [h["id"] for h in api["results"]["zeroshot"]]
    marked = {
        e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#col-lora .hit.shared")
    }
    assert marked == set(api["shared"])
    assert len(driver.find_elements(By.CSS_SELECTOR, "#col-lora .hit.shared .badge")) == len(api["shared"])
    assert all(
        d.get_attribute("naturalWidth") != "0" for d in driver.find_elements(By.CSS_SELECTOR, ".hit img")
    )  # the thumbnails arrived

    # a photo upload (one of the catalog's other views) together with the text, weight 0.3
    top = api["results"]["lora"][0]["id"]
    photo = tmp_path / "query-photo.jpg"
    photo.write_bytes(
        httpx.get(f"{server}/api/products/{category}/{top}/photo", params={"view": "alt"}).content
    )
    driver.find_element(By.ID, "image").send_keys(str(photo))
    wait(driver, lambda d: d.find_element(By.ID, "preview").is_displayed(), "photo preview")
    slider = driver.find_element(By.ID, "weight")
    assert slider.is_enabled()
    driver.execute_script(
        "arguments[0].value = '0.3'; arguments[0].dispatchEvent(new Event('input'));", slider
    )
    driver.find_element(By.ID, "search-btn").click()
    summary = driver.find_element(By.ID, "summary")
    wait(
        driver,
        lambda d: "photo query-photo.jpg" in summary.text and "weight 0.3" in summary.text,
        "photo search",
    )
    assert len(hit_ids(driver, "lora")) == 10
    driver.save_screenshot(str(shots / "serve.png"))

    # "more like this": click a result; the page searches by that product, which is left out
    first = driver.find_element(By.CSS_SELECTOR, "#col-lora .hit")
    clicked = first.get_attribute("data-id")
    first.click()
    wait(driver, lambda d: f"more like {clicked}" in d.find_element(By.ID, "summary").text, "more like this")
    assert driver.find_element(By.ID, "more-like").is_displayed()
    assert driver.find_element(By.ID, "more-like-id").text == clicked
    assert clicked not in hit_ids(driver, "lora") and clicked not in hit_ids(driver, "zeroshot")
    assert len(hit_ids(driver, "lora")) == 10
    driver.save_screenshot(str(shots / "serve-more-like-this.png"))

    outside = [u for u in network_requests(driver) if not u.startswith(server)]
    assert not outside, outside  # everything came from the server itself
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_file_that_is_not_an_image(server, driver, shots, tmp_path):
    # no broken preview but a note; the server's 415 is shown plainly; removing the file clears both
    open_page(driver, server)
    bad = tmp_path / "notes.jpg"
    bad.write_text("<html>not a picture</html>")
    driver.find_element(By.ID, "image").send_keys(str(bad))
    note = driver.find_element(By.ID, "file-note")
    wait(driver, lambda d: note.is_displayed(), "no-preview note")
    assert "cannot read" in note.text
    assert not driver.find_element(By.ID, "preview").is_displayed()
    assert driver.find_element(By.ID, "file-name").text == "notes.jpg"
    driver.find_element(By.ID, "search-btn").click()
    error = driver.find_element(By.ID, "error")
    wait(driver, lambda d: error.is_displayed() and "415" in error.text, "error shown")
    assert "not_image" in error.text
    driver.save_screenshot(str(shots / "serve-error.png"))

    driver.find_element(By.ID, "clear-image").click()
    assert not error.is_displayed()
    assert not note.is_displayed()
    assert driver.find_element(By.ID, "drop-hint").is_displayed()
    # and the page keeps working
    set_query(driver, "a red shirt")
    assert "a red shirt" in search_and_wait(driver, "text search after the bad photo")
    assert not error.is_displayed()
    severe = [
        e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "status of 415" not in e["message"]
    ]
    assert not severe, severe


def test_category_switch_ends_more_like_this(server, project, driver):
    from selenium.webdriver.support.ui import Select

    categories = project[1]
    if len(categories) < 2:
        pytest.skip(f"one category served ({categories[0]}): nothing to switch to")
    open_page(driver, server)
    set_query(driver, "a red shirt")
    search_and_wait(driver, "text search")
    first = driver.find_element(By.CSS_SELECTOR, "#col-lora .hit")
    clicked = first.get_attribute("data-id")
    first.click()
    summary = driver.find_element(By.ID, "summary")
    wait(driver, lambda d: f"more like {clicked}" in summary.text, "more like this")

    # the product belongs to the first category: a switch ends "more like this" and its answers
    Select(driver.find_element(By.ID, "category")).select_by_value(categories[1])
    assert not driver.find_element(By.ID, "more-like").is_displayed()
    assert not driver.find_element(By.ID, "col-lora").is_displayed()
    assert summary.text == ""
    driver.find_element(By.ID, "search-btn").click()
    error = driver.find_element(By.ID, "error")
    wait(driver, lambda d: error.is_displayed(), "error shown")
    assert error.text.startswith("Type a query"), error.text  # asks for a query; nothing was sent
    set_query(driver, "a red shirt")
    text = search_and_wait(driver, "text search in the other category")
    assert text.startswith(f"{categories[1]}: “a red shirt”"), text
    assert not error.is_displayed()


def test_user_text_cannot_reorder_the_page(server, driver, shots):
    # a right-to-left override inside the query stays inside it: the summary around it reads left to right
    open_page(driver, server)
    set_query(driver, "red \u202eshirt")
    search_and_wait(driver, "search with an override")
    summary = driver.find_element(By.ID, "summary")
    category_x = driver.execute_script(TEXT_X, summary, ":")
    top_x = driver.execute_script(TEXT_X, summary, "top")
    ms_x = driver.execute_script(TEXT_X, summary, "ms")
    assert None not in (category_x, top_x, ms_x), summary.text
    assert category_x < top_x < ms_x, (category_x, top_x, ms_x)
    driver.save_screenshot(str(shots / "serve-bidi.png"))
    # catalog text is isolated too: titles and ids in the results and in "more like this"
    for css in ("#col-lora .hit .title bdi", "#col-lora .hit .pid bdi"):
        assert len(driver.find_elements(By.CSS_SELECTOR, css)) == 10, css
    driver.find_element(By.CSS_SELECTOR, "#col-lora .hit").click()
    wait(driver, lambda d: "more like" in summary.text, "more like this")
    for name in ("more-like-title", "more-like-id"):
        bdis = driver.find_elements(By.CSS_SELECTOR, f"#{name} bdi")
        assert len(bdis) == 1 and bdis[0].value_of_css_property("unicode-bidi") == "isolate", name


def test_a_long_query_wraps(server, driver, shots):
    open_page(driver, server)
    limit = httpx_get_json(f"{server}/api/info")["limits"]["max_text_chars"]
    set_query(driver, "x" * limit)  # one word as long as the server takes
    search_and_wait(driver, "long query")
    driver.execute_script("document.getElementById('info').open = true;")  # the metrics tables too
    page_width = "const d = document.documentElement; return [d.scrollWidth, d.clientWidth];"
    width = driver.execute_script(page_width)
    assert width[0] <= width[1], width  # no sideways scrolling
    driver.save_screenshot(str(shots / "serve-long-query.png"))
    try:  # nor in a phone's width
        driver.set_window_size(400, 900)
        width = driver.execute_script(page_width)
        assert width[0] <= width[1], width
        driver.save_screenshot(str(shots / "serve-narrow.png"))
    finally:
        driver.set_window_size(1400, 1000)


def test_metrics_show_confidence_intervals(server, driver, shots):
    info = httpx_get_json(f"{server}/api/info")
    open_page(driver, f"{server}/#info")
    driver.execute_script("document.getElementById('info').open = true;")
    shown = 0
    for category, cat in info["categories"].items():
        for variant, v in cat["variants"].items():
            if not v["metrics"]:
                continue
            table = driver.find_element(
                By.CSS_SELECTOR, f"table.metrics[data-category='{category}'][data-variant='{variant}']"
            )
            columns = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
            for row in table.find_elements(By.CSS_SELECTOR, "tr[data-mode]"):
                mode = v["metrics"][row.get_attribute("data-mode")]
                cells = row.find_elements(By.TAG_NAME, "td")
                for key, cell in zip(columns[1:], cells[1:]):
                    if key not in mode.get("ci95", {}):
                        continue
                    ci = mode["ci95"][key]
                    assert cell.text == f"{mode[key]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]", (
                        key,
                        cell.text,
                    )
                    shown += 1
    assert shown >= 10  # the committed metrics files hold CIs, and the page shows them
    driver.execute_script("document.querySelector('table.metrics').scrollIntoView();")
    driver.save_screenshot(str(shots / "serve-metrics.png"))


def test_plots_are_drawn_offline(server, driver, shots):
    # the page's plots section: the project's DVC plots drawn by the vendored vega
    n_plots = len(httpx_get_json(f"{server}/api/plots")["plots"])
    assert n_plots >= 4
    driver.get(f"{server}/#plots")
    body = driver.find_element(By.ID, "plots-body")
    wait(driver, lambda d: body.get_attribute("data-rendered") == str(n_plots), "plots drawn")
    charts = body.find_elements(By.CSS_SELECTOR, ".vega-embed svg.marks")
    assert len(charts) == n_plots
    assert ink(body.screenshot_as_png) > 0.01
    # together they fill the section's width, not the left half of it
    left = min(c.rect["x"] for c in charts)
    right = max(c.rect["x"] + c.rect["width"] for c in charts)
    assert right - left >= 0.9 * body.rect["width"], (left, right, body.rect)
    driver.save_screenshot(str(shots / "serve-plots.png"))

    # `dvc plots show` of this repository, opened from disk with no server: the offline template
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=REPO, check=True, capture_output=True)
    network_requests(driver)  # drop what the page above asked for
    driver.get((REPO / "dvc_plots" / "index.html").as_uri())
    wait(
        driver,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".vega-embed canvas, .vega-embed svg.marks"))
            == len(d.find_elements(By.CSS_SELECTOR, ".vega-embed"))
            >= 4
        ),
        "dvc plots drawn",
    )
    assert driver.find_element(By.ID, "offline-check").text == ""  # vega-embed loaded
    assert ink(driver.get_screenshot_as_png()) > 0.01
    driver.save_screenshot(str(shots / "dvc-plots.png"))
    assert network_requests(driver) == []  # all from disk


def test_api_docs_render_offline(server, driver, shots):
    network_requests(driver)  # drop earlier requests
    driver.get(f"{server}/docs")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5, "Swagger UI operations")
    paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/search", "/api/info", "/healthz"} <= paths
    outside = [u for u in network_requests(driver) if not u.startswith(server)]
    assert not outside, outside
    driver.save_screenshot(str(shots / "serve-docs.png"))
