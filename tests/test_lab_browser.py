"""The live controls in a real browser: JupyterLab (``./run.sh lab``) driven by Playwright in headless Chromium.

The phantom template, given the smoke grid's parameters by papermill (not executed) with its
results and models in a tmp folder, is opened in JupyterLab and run with Run > Run All Cells. No
cell may fail; then the live controls certify the default image and sigma, and another image at
another sigma: the controls are disabled and a progress line shows each method while it runs, and
the abstention maps and their numbers change. Screenshots go to MEDCERT_SCREENSHOTS, else
runs/screenshots/ (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lab import free_port

from medcert_core.study.grid.spec import load_grid

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("MEDCERT_CHROMIUM", "/usr/bin/chromium"))
TOKEN = "medcert-browser-test"
MINUTE = 60_000  # Playwright timeouts are in milliseconds

pytestmark = pytest.mark.slow

# Every error output of the notebook's cells (the app is exposed by --LabApp.expose_app_in_browser).
CELL_ERRORS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const outputs = cells.get(i).outputs;
    for (let j = 0; outputs && j < outputs.length; j++) {
      const output = outputs.get(j).toJSON();
      if (output.output_type === 'error') errors.push(`cell ${i}: ${output.ename}: ${output.evalue}`);
    }
  }
  return errors;
}"""

# The notebook's kernel has started and is idle.
KERNEL_IDLE = "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"

# Every code cell has run (a number in its prompt), or one has failed (Run All stops there).
ALL_RUN_OR_FAILED = f"""() => {{
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  return ({KERNEL_IDLE})() && prompts.length > 0 && (prompts.every(p => /^\\[\\d+\\]:?$/.test(p)) ||
         (({CELL_ERRORS})().length > 0 && !prompts.some(p => p.startsWith('[*]'))));
}}"""

# Records, on every change inside the live box, how many pickers are disabled and the status line.
WATCH = """() => {
  const box = document.querySelector('.medcert-live');
  const seen = window.medcertSeen = [];
  const record = () => seen.push({
    disabled: [...box.querySelectorAll('select, button')].filter(e => e.disabled).length,
    status: box.querySelector('.medcert-live-status').textContent.trim()});
  new MutationObserver(record).observe(box, {subtree: true, childList: true, attributes: true, characterData: true});
}"""

# The plotly images of the live figure: noisy input, ground truth, then each method's map.
LIVE_MAPS = """() => [...document.querySelectorAll('.medcert-live .js-plotly-plot image')]
  .map(image => image.getAttribute('href') || image.getAttribute('xlink:href'))"""


@pytest.fixture
def browser():
    """Headless Chromium (Debian's) through Playwright; skipped where it is missing, except in CI."""
    if not CHROMIUM.is_file():
        message = f"headless Chromium not found at {CHROMIUM} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            raise AssertionError(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def save_screenshot(target, name: str) -> None:
    """A screenshot of ``target`` (page or element) as ``<name>.png`` in MEDCERT_SCREENSHOTS, else runs/screenshots/."""
    folder = Path(os.environ.get("MEDCERT_SCREENSHOTS", REPO / "runs" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    target.screenshot(path=str(folder / f"{name}.png"))
    print(f"screenshot: {folder / name}.png")


def prepare_notebook(folder: Path) -> Path:
    """notebooks/phantom.ipynb with the smoke grid's parameters injected (not run), its stores under ``folder``."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    entry = next(entry for entry in load_grid(REPO / "grids" / "smoke.yaml", REPO / "notebooks")
                 if entry.notebook == "phantom")
    parameters = {**entry.parameters, "interactive": True, "results_dir": str(folder / "results"),
                  "cache_dir": str(folder / "cache")}
    notebook = load_notebook_node(str(REPO / "notebooks" / "phantom.ipynb"))
    notebook = parameterize_notebook(notebook, parameters, kernel_name="medcert", language="python")
    notebook.metadata["kernelspec"] = {"name": "medcert", "display_name": "medcert (.venv)", "language": "python"}
    path = folder / "phantom.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def lab(tmp_path) -> Iterator[str]:
    """``./run.sh lab`` serving ``tmp_path`` on a free port; yields its base URL; stops it afterwards."""
    port = free_port()
    environment = {**os.environ, "MEDCERT_VENV": str(Path(sys.prefix).relative_to(REPO))
                   if Path(sys.prefix).is_relative_to(REPO) else ".venv"}
    serve = [f"--FileContentsManager.root_dir={tmp_path}", f"--MappingKernelManager.root_dir={tmp_path}"]
    server = subprocess.Popen([str(REPO / "run.sh"), "lab", "--port", str(port), f"--IdentityProvider.token={TOKEN}",
                               *serve, "--LabApp.expose_app_in_browser=True"],
                              cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, server)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server shuts its kernels down
        server.wait(timeout=60)


def wait_for_server(base: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=5) as response:
                json.load(response)
                return
        except OSError:
            assert server.poll() is None, server.stdout.read().decode(errors="replace")[-2000:]
            time.sleep(1)
    raise AssertionError(f"JupyterLab did not answer within {seconds:.0f} s")


def start_kernel(page) -> None:
    """Wait for the notebook's kernel, accepting the "Select Kernel" dialog (medcert is preselected) if it asks."""
    page.wait_for_function(f"() => document.querySelector('.jp-Dialog') !== null || ({KERNEL_IDLE})()",
                           timeout=3 * MINUTE, polling=500)
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        assert "medcert" in dialog.inner_text(), dialog.inner_text()
        dialog.locator(".jp-mod-accept").click()
    page.wait_for_function(KERNEL_IDLE, timeout=3 * MINUTE, polling=500)


def dismiss_news(page) -> None:
    """Answer "No" to JupyterLab's "notified about official Jupyter news?" toast, if it shows (it hides the widgets)."""
    no = page.locator(".Toastify__toast").get_by_role("button", name="No", exact=True)
    if no.count():
        no.first.click()
        page.locator(".Toastify__toast").first.wait_for(state="detached")


def run_all_cells(page) -> None:
    """Run > Run All Cells, then wait until every cell has run (or one failed)."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    page.wait_for_function(ALL_RUN_OR_FAILED, timeout=5 * MINUTE, polling=1000)


def certify(page, shot: str, *, image: int | None = None, sigma: int | None = None) -> dict[str, object]:
    """Pick the image and sigma (option indices; None keeps them), click certify and wait for the result;
    screenshots of the live box while it runs (or just after) and at the end: ``<shot>_running.png``, ``<shot>.png``."""
    box = page.locator(".medcert-live")
    pickers = box.locator(".widget-dropdown select")
    if image is not None:
        pickers.nth(0).select_option(index=image)
    if sigma is not None:
        pickers.nth(1).select_option(index=sigma)
    chosen = [pickers.nth(k).evaluate("select => select.options[select.selectedIndex].text") for k in (0, 1)]
    expected = f"certified {chosen[0]} at σ = {float(chosen[1]):g}"
    page.evaluate(WATCH)
    box.get_by_role("button", name="certify").click()
    page.wait_for_function("() => window.medcertSeen.some(s => s.status.startsWith('certifying'))", timeout=MINUTE)
    save_screenshot(box, f"{shot}_running")
    page.wait_for_function("() => !document.querySelector('.medcert-live button').disabled",  # done (or failed)
                           timeout=3 * MINUTE, polling=500)
    status = box.locator(".medcert-live-status").inner_text().strip()
    errors = box.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    assert status == expected and not errors, f"the live certification: {status!r}, stderr: {errors}"
    page.wait_for_function(f"() => ({LIVE_MAPS})().length >= 4", timeout=MINUTE)
    save_screenshot(box, shot)
    return {"numbers": box.locator(".medcert-live-numbers").inner_text(), "maps": page.evaluate(LIVE_MAPS),
            "seen": page.evaluate("() => window.medcertSeen")}


def test_live_controls_recertify_in_jupyterlab(browser, lab, tmp_path):
    prepare_notebook(tmp_path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(MINUTE)
    page.goto(f"{lab}/lab/tree/phantom.ipynb?token={TOKEN}")
    start_kernel(page)
    run_all_cells(page)
    errors = page.evaluate(CELL_ERRORS)
    assert errors == [], f"cells of the notebook failed: {errors}"
    dismiss_news(page)
    page.locator(".medcert-live").scroll_into_view_if_needed()
    save_screenshot(page, "lab_run_all")

    first = certify(page, "lab_live_first")
    second = certify(page, "lab_live_second", image=3, sigma=1)
    for run in (first, second):
        assert len(run["maps"]) == 4, f"noisy input, ground truth and two methods: {len(run['maps'])} images"
        assert run["numbers"].count("% abstain, certified Dice") == 2, run["numbers"]
        assert any(seen["disabled"] == 3 for seen in run["seen"]), f"never disabled while running: {run['seen']}"
        progress = {re.search(r"method \d of \d", seen["status"]).group() for seen in run["seen"]
                    if seen["status"].startswith("certifying")}
        assert {"method 1 of 2", "method 2 of 2"} <= progress, f"the progress line showed {progress}"
    assert first["maps"][2:] != second["maps"][2:], "the re-certified abstention maps did not change"
    assert first["numbers"] != second["numbers"], f"the numbers did not change: {first['numbers']}"
    print(f"numbers before: {first['numbers']!r}\nnumbers after:  {second['numbers']!r}")
