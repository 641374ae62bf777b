"""The website end to end: the smoke grid executed by papermill, a small Jupyter Book built from it,
and its pages opened in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Checks: no console error, no request leaves the machine, every results chapter shows a rendered
plotly chart and a results table; a screenshot is saved (MEDCERT_SCREENSHOTS, else runs/screenshots/, git-ignored).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from medcert_core.study.report.book import build_book
from medcert_core.study.grid.local import run_grid
from medcert_core.study.grid.spec import GridEntry, load_grid

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("MEDCERT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

pytestmark = pytest.mark.slow


def _require_chromium() -> None:
    if CHROMIUM.is_file():
        return
    message = f"headless Chromium not found at {CHROMIUM} (Debian: apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        raise AssertionError(message)
    pytest.skip(message)


def smoke_entries(root: Path) -> list[GridEntry]:
    return [GridEntry(entry.notebook, entry.output, {**entry.parameters, "results_dir": str(root / "results"),
                                                     "cache_dir": str(root / "cache")})
            for entry in load_grid(REPO / "grids" / "smoke.yaml", REPO / "notebooks")]


def run_smoke_grid(root: Path) -> list[Path]:
    return run_grid(smoke_entries(root), notebooks_dir=REPO / "notebooks", book_dir=root / "book",
                    results_dir=root / "results", cwd=root)


@pytest.fixture(scope="module")
def smoke_site(tmp_path_factory) -> Path:
    """A built book with the smoke grid's chapters: returns its _build/html folder."""
    root = tmp_path_factory.mktemp("site")
    entries = smoke_entries(root)
    run_smoke_grid(root)
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    (root / "book" / "intro.md").write_text("# Smoke book\n\nThe smoke grid's chapters.\n")
    shutil.copy(REPO / "book" / "method.md", root / "book" / "method.md")  # the formulas, typeset by MathJax
    toc = {"format": "jb-book", "root": "book/intro",
           "chapters": [{"file": "book/method"}] + [{"file": f"book/{entry.output}"} for entry in entries]}
    (root / "_toc.yml").write_text(yaml.safe_dump(toc))
    index = build_book(root, REPO / "notebooks")
    return index.parent


@pytest.fixture(scope="module")
def served(smoke_site):
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(smoke_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_executed_chapters_keep_no_progress_bar_noise(smoke_site):
    import nbformat

    notebook = nbformat.read(smoke_site.parents[1] / "book" / "phantom.ipynb", as_version=4)
    assert notebook.metadata["medcert"]["parameters"]["interactive"] is False
    streams = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
               if out.output_type == "stream" and out.name == "stderr"]
    assert streams == []
    assert not list((smoke_site.parents[1] / "book").glob(".*.running.ipynb"))


def test_every_executed_chapter_ends_with_the_command_that_reruns_it(smoke_site):
    import shlex

    import nbformat

    root = smoke_site.parents[1]
    for entry in smoke_entries(root):
        notebook = nbformat.read(root / "book" / f"{entry.output}.ipynb", as_version=4)
        box = notebook.cells[-1]
        assert box.cell_type == "markdown" and box.source.startswith("````{admonition} Rerun this chapter")
        line = next(line for line in box.source.splitlines() if "/bin/papermill " in line)
        argv = shlex.split(line)
        assert argv[0] == ".venv/bin/papermill" and (root / argv[1]).resolve() == REPO / "notebooks" / f"{entry.notebook}.ipynb"
        assert argv[argv.index("-y") + 1] and yaml.safe_load(argv[argv.index("-y") + 1]) == entry.parameters
        page = (smoke_site / "book" / f"{entry.output}.html").read_text()
        assert "admonition" in page and "Rerun this chapter" in page


def test_a_finished_grid_is_not_executed_again(smoke_site, monkeypatch):
    root = smoke_site.parents[1]
    before = {path: path.stat().st_mtime_ns for path in (root / "book").glob("*.ipynb")}

    def must_not_execute(*args, **kwargs):
        raise AssertionError("a notebook already executed with these parameters ran again")

    monkeypatch.setattr("medcert_core.study.grid.local.execute", must_not_execute)
    outputs = run_smoke_grid(root)
    assert sorted(outputs) == sorted(before)
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_site_works_offline_with_charts_and_tables(served, smoke_site):
    _require_chromium()
    from playwright.sync_api import sync_playwright

    screenshots = Path(os.environ.get("MEDCERT_SCREENSHOTS", REPO / "runs" / "screenshots"))
    screenshots.mkdir(parents=True, exist_ok=True)
    external, console_errors = [], []

    def route(route, request) -> None:
        if urlparse(request.url).hostname in LOCAL_HOSTS or request.url.startswith("data:"):
            route.continue_()
        else:
            external.append(request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.route("**/*", route)
        page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
        page.on("pageerror", lambda error: console_errors.append(str(error)))

        page.goto(f"{served}/index.html", wait_until="networkidle")
        assert "Smoke book" in page.content()
        for chapter in ("phantom", "segcertify_vs_ours"):
            page.goto(f"{served}/book/{chapter}.html", wait_until="networkidle")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20_000)
            charts = page.locator(".js-plotly-plot").count()
            assert charts >= 2, f"{chapter}: {charts} plotly charts rendered (Dice against σ and abstention maps)"
            tables = page.locator("table.medcert-results")
            assert tables.count() >= 1, f"{chapter}: no results table"
            assert "Dice" in tables.first.inner_text()
            shot = screenshots / f"{chapter}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        page.goto(f"{served}/book/method.html", wait_until="networkidle")
        page.wait_for_selector("mjx-container", timeout=20_000)
        formulas = page.locator("mjx-container")
        assert formulas.count() >= 8, f"{formulas.count()} formulas typeset in the method chapter"
        assert page.locator("mjx-container[display='true']").count() >= 6, "the display formulas"
        assert page.locator("mjx-merror").count() == 0, "a formula MathJax could not parse"
        shot = screenshots / "method.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        browser.close()

    assert external == [], f"requests left the machine: {external}"
    assert console_errors == [], f"console errors: {console_errors}"


CDN_HOSTS = ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "cdn.plot.ly", "polyfill.io",
             "fonts.googleapis.com", "fonts.gstatic.com", "code.jquery.com", "mathjax.org")


def test_no_page_loads_anything_from_a_cdn(smoke_site):
    """Every script, style, font and image a page asks for (src=, href= of link tags) is local."""
    import re

    loads = re.compile(r"<(?:script|link|img)\b[^>]*?(?:src|href)=[\"']([^\"']+)[\"']", re.IGNORECASE)
    pages = list(smoke_site.rglob("*.html"))
    assert len(pages) >= 3
    remote = [(page.name, url) for page in pages for url in loads.findall(page.read_text(errors="replace"))
              if url.startswith(("http:", "https:", "//")) or any(host in url for host in CDN_HOSTS)]
    assert remote == [], f"pages load from outside the site: {remote[:5]}"
    assert (smoke_site / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax ships with the site"
