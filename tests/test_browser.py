"""The notebooks' widgets, proven in a real JupyterLab in a real browser (Chromium).

For each notebook that shows a widget, the test starts JupyterLab on a
temporary copy of the notebooks (quick mode), opens the notebook in
Chromium, runs all cells, then moves every control (slider, dropdown,
toggle button, checkbox) and checks that what the widget drives (its text,
numbers or figure) changes.  It saves the executed notebook and checks that
no cell produced an error, and it leaves screenshots in
``build/screenshots/``.

Chromium comes from the system (Debian: ``apt-get install chromium``) and is
driven by the ``playwright`` Python package; no browser is downloaded.  In CI
the test must run; elsewhere it skips with instructions when Chromium is
missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = Path(os.environ.get("NNLAB_BROWSER_NOTEBOOKS", ROOT / "notebooks"))
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "nnlab-browser-test"
RUN_TIMEOUT_S = 420
MOVE_TIMEOUT_S = 20

# What a user moves, and what a widget shows.
CONTROLS = ".widget-slider, .widget-dropdown, .widget-toggle-buttons, .widget-checkbox"
_WIDGET_MARKERS = ("nnlab.widgets", "_explorer(")


def widget_notebooks():
    found = []
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
        if any(marker in src for marker in _WIDGET_MARKERS):
            found.append(path.name)
    return found


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium_path():
    path = _chromium()
    if path is None:
        msg = ("Chromium not found. Install it (Debian/Ubuntu: `sudo apt-get install chromium`) to run the "
               "browser test; the Python package `playwright` drives it, no `playwright install` needed.")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("playwright.sync_api")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, chromium_path):
    """JupyterLab on a temporary copy of the notebooks, in quick mode."""
    work = tmp_path_factory.mktemp("lab")
    for path in NOTEBOOK_DIR.glob("*.ipynb"):
        shutil.copy(path, work / path.name)
    if (NOTEBOOK_DIR / "solutions").is_dir():
        shutil.copytree(NOTEBOOK_DIR / "solutions", work / "solutions")
    port = _free_port()
    env = {**os.environ, "NNLAB_QUICK": "1", "TQDM_DISABLE": "1", "JUPYTER_PLATFORM_DIRS": "1"}
    cmd = [sys.executable, "-m", "jupyter", "lab", f"--port={port}", "--no-browser", "--allow-root",
           f"--ServerApp.root_dir={work}", f"--IdentityProvider.token={TOKEN}",
           "--ServerApp.ip=127.0.0.1", f"--LabApp.workspaces_dir={work / '.workspaces'}",
           f"--LabApp.user_settings_dir={work / '.settings'}"]
    log = open(work / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (work / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "dir": work}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium_path,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


# -- helpers that run in the page ---------------------------------------------

_CELL_STATE_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell')).map(
    c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '')"""

# The driven state of the widget that holds `el`: every text and image in its
# output area except the controls themselves (whose readouts change on a move).
_DRIVEN_STATE_JS = """(el) => {
    const area = el.closest('.jp-OutputArea-output') || el.closest('.jp-OutputArea');
    const clone = area.cloneNode(true);
    clone.querySelectorAll('%s').forEach(c => c.remove());
    const imgs = Array.from(clone.querySelectorAll('img')).map(i => i.src.length + ':' + i.src.slice(-200));
    return clone.innerText + '|' + imgs.join('|');
}""" % CONTROLS


def _accept_kernel_dialog(page):
    """A fresh workspace may ask which kernel to start: accept the notebook's own (Python 3)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and "Kernel" in dialog.first.inner_text():
        dialog.first.locator(".jp-Dialog-button.jp-mod-accept").click()
        page.wait_for_selector(".jp-Dialog", state="detached", timeout=10_000)


def _menu(page, item):
    _accept_kernel_dialog(page)
    page.keyboard.press("Escape")  # close any open menu or toast
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def _run_all(page):
    """Run every cell and wait until all have run.

    A kernel that is still connecting can drop part of a "Run All" request
    (seen on a busy machine: the first cell runs, the rest stay queued for
    nothing).  If the kernel sits idle while cells are still unrun, run on
    from the first unrun cell, as a user would.
    """
    _menu(page, "Run All Cells")
    deadline = time.time() + RUN_TIMEOUT_S
    idle_since = None
    while time.time() < deadline:
        _accept_kernel_dialog(page)
        prompts = page.evaluate(_CELL_STATE_JS)
        if prompts and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts):
            return prompts
        running = any(p.strip() == "[*]:" for p in prompts)
        status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
        if not running and status == "idle":
            idle_since = idle_since or time.time()
            if time.time() - idle_since > 10:
                first = next(i for i, p in enumerate(prompts) if p.strip() in ("[ ]:", ""))
                cell = page.locator(".jp-Notebook .jp-CodeCell").nth(first)
                cell.scroll_into_view_if_needed()
                cell.locator(".jp-InputPrompt").click()
                _menu(page, "Run Selected Cell and All Below")
                idle_since = None
        else:
            idle_since = None
        time.sleep(1)
    raise AssertionError(f"cells still running after {RUN_TIMEOUT_S} s: {page.evaluate(_CELL_STATE_JS)}")


def _move(control, page):
    """Move one control to a different value, like a user would."""
    kind = control.get_attribute("class")
    if "widget-slider" in kind:
        handle = control.locator(".noUi-handle").first
        handle.focus()
        before = handle.get_attribute("aria-valuenow")
        for _ in range(5):
            handle.press("ArrowRight")
        if handle.get_attribute("aria-valuenow") == before:  # already at its maximum: go left
            for _ in range(5):
                handle.press("ArrowLeft")
        return "slider"
    if "widget-dropdown" in kind:
        select = control.locator("select")
        options = select.locator("option").all()
        current = select.input_value()
        values = [o.get_attribute("value") for o in options]
        target = next(v for v in reversed(values) if v != current)
        select.select_option(target)
        return "dropdown"
    if "widget-toggle-buttons" in kind:
        buttons = control.locator("button").all()
        target = next(b for b in buttons if "mod-active" not in (b.get_attribute("class") or ""))
        target.click()
        return "toggle"
    if "widget-checkbox" in kind:
        control.locator("input").click()
        return "checkbox"
    raise AssertionError(f"unknown control {kind}")


@pytest.mark.parametrize("notebook", widget_notebooks())
def test_widgets_update_in_a_real_browser(lab, browser, notebook):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    stem = Path(notebook).stem
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console_errors = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        # A workspace of its own, reset: only this notebook is open, whatever an earlier page left.
        page.goto(f"{lab['url']}/lab/workspaces/{stem}/tree/{notebook}?reset&token={TOKEN}",
                  wait_until="domcontentloaded")
        page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=120_000)
        time.sleep(2)  # let a kernel-choice dialog appear, if the workspace asks for one
        _accept_kernel_dialog(page)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
        _run_all(page)
        page.screenshot(path=str(SCREENSHOTS / f"{stem}-ran.png"), full_page=False)

        controls = page.locator(f".jp-OutputArea-output :is({CONTROLS})")
        count = controls.count()
        assert count > 0, f"{notebook}: no widget controls rendered"
        moved = []
        for i in range(count):
            control = controls.nth(i)
            if not control.is_visible():
                continue
            control.scroll_into_view_if_needed()
            before = control.evaluate(_DRIVEN_STATE_JS)
            kind = _move(control, page)
            deadline = time.time() + MOVE_TIMEOUT_S
            after = before
            while time.time() < deadline:
                time.sleep(0.3)
                after = control.evaluate(_DRIVEN_STATE_JS)
                if after != before:
                    break
            page.screenshot(path=str(SCREENSHOTS / f"{stem}-control{i}-{kind}.png"))
            assert after != before, (
                f"{notebook}: moving control {i} ({kind}) did not change what the widget shows "
                f"within {MOVE_TIMEOUT_S} s")
            moved.append(kind)
        assert moved, f"{notebook}: no visible control to move"

        # Save, then read the executed notebook from disk: no cell may hold an error.
        page.keyboard.press("Control+s")
        saved = lab["dir"] / notebook
        deadline = time.time() + 30
        while time.time() < deadline:
            nb = json.loads(saved.read_text())
            if all(c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"):
                break
            time.sleep(0.5)
        errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb["cells"])
                  for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{notebook}: cells with errors: {errors}"
        unexecuted = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and not c["execution_count"]]
        assert not unexecuted, f"{notebook}: cells not executed: {unexecuted}"
        assert not console_errors, f"{notebook}: JavaScript errors: {console_errors[:3]}"
    except BaseException:
        page.screenshot(path=str(SCREENSHOTS / f"{stem}-FAILED.png"))
        raise
    finally:
        page.close()
