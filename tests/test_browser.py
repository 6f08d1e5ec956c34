"""The notebooks' widgets, proven in a real JupyterLab in a real browser (Chromium).

For each notebook that shows a widget, the test starts JupyterLab on a
temporary copy of the notebooks (quick mode) with the course's JupyterLab
settings (``binder/lab-settings``, as ``make lab`` and Binder use them),
opens the notebook in Chromium and runs all cells.  Then, for every
explorer, it checks that each control displays the setting the explorer
computed with (the cells below an explorer drive it from code, and its
sliders must follow), moves every control (slider, dropdown, toggle button,
checkbox) and checks that what the widget drives (its text, numbers or
figure) changes and still matches the controls.  The budget explorer's
slider is also moved to both ends: the bits it chooses per layer must change,
and the budget its choice was made for must be the one the slider shows.  It saves the executed
notebook and checks that no cell produced an error and that no news pop-up
covers the notebook; it leaves screenshots in ``build/screenshots/``.

Waits are long enough for a slow kernel on a loaded machine (a run goes on as
long as cells keep finishing), but an error in a cell, a dead kernel or a
JavaScript error fails the test at once.

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
LAB_SETTINGS = ROOT / "binder" / "lab-settings"
SCREENSHOTS = ROOT / "build" / "screenshots"
TOKEN = "nnlab-browser-test"
# A run fails when no cell has finished for CELL_TIMEOUT_S (a slow kernel keeps going), or after RUN_TIMEOUT_S.
CELL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 2400
MOVE_TIMEOUT_S = 90

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
           f"--LabApp.user_settings_dir={work / '.settings'}", f"--LabApp.app_settings_dir={LAB_SETTINGS}"]
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

# The text of every error output (a traceback) in the notebook.
_ERRORS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')).map(
    e => e.innerText.slice(-2000))"""

# For every explorer on the page: the settings it computed with (its hidden `.nnlab-shown` record, keyed by
# control description) against what each control in the same output displays (slider readout, selected
# option, active toggle button).  Returns [{shown, controls, mismatches}].
_CONTROLS_MATCH_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .nnlab-shown')).map(el => {
    const shown = JSON.parse(el.dataset.shown);
    const area = el.closest('.jp-OutputArea-output');
    const controls = {};
    const text = t => t.replace(/\\s+/g, ' ').trim();  // option labels use non-breaking spaces
    area.querySelectorAll('%s').forEach(c => {
        const label = c.querySelector('.widget-label');
        const name = label ? text(label.textContent) : '';
        let value = null;
        if (c.classList.contains('widget-slider')) {
            const r = c.querySelector('.widget-readout');
            value = r ? text(r.tagName === 'INPUT' ? r.value : r.textContent) : null;
        } else if (c.classList.contains('widget-dropdown')) {
            const s = c.querySelector('select');
            value = s && s.selectedIndex >= 0 ? text(s.options[s.selectedIndex].textContent) : null;
        } else if (c.classList.contains('widget-toggle-buttons')) {
            const b = c.querySelector('button.mod-active');
            value = b ? text(b.textContent) : null;
        } else if (c.classList.contains('widget-checkbox')) {
            const i = c.querySelector('input');
            value = i ? String(i.checked) : null;
        }
        if (name) controls[name] = value;
    });
    const mismatches = [];
    for (let [name, value] of Object.entries(shown)) {
        name = text(name);
        value = text(value);
        if (!(name in controls)) mismatches.push(`${name}: shown ${value}, no control with that name`);
        else if (controls[name] !== value) mismatches.push(`${name}: shown ${value}, control says ${controls[name]}`);
    }
    const reported = Object.keys(shown).map(text);
    for (const name of Object.keys(controls)) {
        if (!reported.includes(name)) mismatches.push(`${name}: a control whose setting the explorer does not report`);
    }
    return {shown, controls, mismatches};
})""" % CONTROLS

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


def _fail_on_errors(page, notebook, console_errors):
    """Fail at once on an error output, a dead kernel or a JavaScript error."""
    errors = page.evaluate(_ERRORS_JS)
    assert not errors, f"{notebook}: a cell raised an error:\n{errors[0]}"
    status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
    assert status not in ("dead", "terminating"), f"{notebook}: the kernel died ({status})"
    assert not console_errors, f"{notebook}: JavaScript errors: {console_errors[:3]}"


def _run_all(page, notebook, console_errors):
    """Run every cell and wait until all have run.

    The wait tolerates a slow kernel: it goes on as long as cells keep
    finishing (CELL_TIMEOUT_S without progress, or RUN_TIMEOUT_S in all,
    fails), but an error output, a dead kernel or a JavaScript error fails at
    once.  A kernel that is still connecting can drop part of a "Run All"
    request (seen on a busy machine: the first cell runs, the rest stay
    queued for nothing); if the kernel sits idle while cells are still unrun
    and nothing failed, run on from the first unrun cell, as a user would.
    """
    _menu(page, "Run All Cells")
    start = time.time()
    idle_since, done, progress_at = None, -1, time.time()
    while True:
        now = time.time()
        prompts = page.evaluate(_CELL_STATE_JS)
        assert now - progress_at < CELL_TIMEOUT_S and now - start < RUN_TIMEOUT_S, (
            f"{notebook}: no cell finished for {now - progress_at:.0f} s ({now - start:.0f} s in all): {prompts}")
        _accept_kernel_dialog(page)
        _fail_on_errors(page, notebook, console_errors)
        finished = sum(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts)
        if finished != done:
            done, progress_at = finished, now
        if prompts and finished == len(prompts):
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


def _controls_match(page, notebook, when, timeout=MOVE_TIMEOUT_S):
    """Every explorer's controls display the settings it computed with (waits for an update in flight)."""
    deadline = time.time() + timeout
    while True:
        explorers = page.evaluate(_CONTROLS_MATCH_JS)
        bad = [e for e in explorers if e["mismatches"]]
        if not bad or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not bad, (f"{notebook}: {when}, an explorer's controls do not show what it computed: "
                     f"{[e['mismatches'] for e in bad]}")
    return explorers


def _no_news_popup(page, lab, notebook):
    """The course's settings are in force, and no toast asks about (or shows) Jupyter news."""
    req = urllib.request.urlopen(
        f"{lab['url']}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={TOKEN}", timeout=10)
    plugin = json.loads(req.read())
    default = plugin["schema"]["properties"]["fetchNews"].get("default")  # overrides.json sets the defaults
    assert default == "false" and plugin.get("settings", {}).get("fetchNews", "false") == "false", (
        f"JupyterLab does not use binder/lab-settings: fetchNews defaults to {default!r}, "
        f"user settings {plugin.get('settings')}")
    toasts = page.locator(".Toastify__toast").all_inner_texts()
    news = [t for t in toasts if "news" in t.lower()]
    assert not news, f"{notebook}: a news pop-up covers the notebook: {news}"


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


# The budget explorer (nnlab.widgets.budget_explorer): its slider's readout, the budget its label says it chose
# for, and the chosen bits and zeros per layer (the label's table), read from the output that holds `el`.
_BUDGET_STATE_JS = """(el) => {
    const area = el.closest('.jp-OutputArea-output');
    const label = area.querySelector('.widget-html-content');
    const readout = el.querySelector('.widget-readout');
    const rows = label ? Array.from(label.querySelectorAll('tr')).slice(1) : [];
    return {
        readout: readout ? (readout.tagName === 'INPUT' ? readout.value : readout.textContent).trim() : null,
        label: label ? label.innerText : '',
        layers: rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.textContent.trim())),
        image: Array.from(area.querySelectorAll('img')).map(i => i.src.length + ':' + i.src.slice(-200)).join('|'),
    };
}"""


def _number(text):
    """A number as a slider readout or a label writes it ("3.454e+4", "34,544.5")."""
    return float(text.replace(",", "").replace("\u2212", "-"))


def _budget_state(slider):
    """(budget on the slider, budget the choice was made for, {layer: (bits, zeros)}, figure) of a budget explorer."""
    state = slider.evaluate(_BUDGET_STATE_JS)
    words = state["label"].split()
    chosen_for = _number(words[words.index("budget") + 1]) if "budget" in words else None
    layers = {row[0]: tuple(row[1:]) for row in state["layers"] if row}
    return _number(state["readout"]), chosen_for, layers, state["image"]


def _budget_settled(slider, page, notebook, console_errors, when, moved_from=None):
    """Wait until the budget explorer's choice is made for the budget its slider shows (and, with
    ``moved_from``, a state before a move, the slider left that budget and the figure was redrawn);
    return (budget shown, budget chosen for, layers, figure)."""
    deadline = time.time() + MOVE_TIMEOUT_S
    while True:
        _fail_on_errors(page, notebook, console_errors)
        shown, chosen_for, layers, image = _budget_state(slider)
        # The readout rounds to 4 significant digits; the label writes 6.
        settled = chosen_for is not None and abs(chosen_for - shown) <= 1e-3 * abs(shown) and layers
        if settled and (moved_from is None or (shown != moved_from[0] and image != moved_from[3])):
            return shown, chosen_for, layers, image
        assert time.time() < deadline, (
            f"{notebook}: {when}: after {MOVE_TIMEOUT_S} s the budget slider shows {shown:,.6g} but the choice "
            f"was made for {chosen_for}" + ("" if moved_from is None else f" (before the move: {moved_from[0]:,.6g}; "
                                            f"figure redrawn: {image != moved_from[3]})"))
        time.sleep(0.5)


def _budget_follows(slider, key, page, notebook, console_errors, before):
    """Press ``key`` on the budget slider; wait until the choice is made for the budget it shows; return it."""
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    handle.press(key)
    return _budget_settled(slider, page, notebook, console_errors, f"{key} on the budget slider", before)


def _check_budget_explorer(page, notebook, console_errors):
    """Move the budget explorer's slider to both ends: the chosen bits per layer must change and follow it.

    Returns the states seen (budget on the slider, budget chosen for, layers, figure), or [] without one.
    """
    sliders = page.locator(".jp-OutputArea-output .widget-slider").filter(
        has=page.locator(".widget-label", has_text="budget"))
    if not sliders.count():
        return []
    slider = sliders.first
    slider.scroll_into_view_if_needed()
    start = _budget_settled(slider, page, notebook, console_errors, "after the moves above")
    deadline = time.time() + MOVE_TIMEOUT_S
    while time.time() < deadline:  # the figure arrives just after the label: wait until it stops changing
        time.sleep(1)
        again = _budget_state(slider)
        if again == start:
            break
        start = again
    low = _budget_follows(slider, "Home", page, notebook, console_errors, start)
    high = _budget_follows(slider, "End", page, notebook, console_errors, low)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(notebook).stem}-budget-end.png"))
    assert low[0] < high[0], f"{notebook}: Home and End did not move the budget slider down and up: {low[0]}, {high[0]}"
    bits_low = {layer: v[0] for layer, v in low[2].items()}
    bits_high = {layer: v[0] for layer, v in high[2].items()}
    assert bits_low != bits_high, (
        f"{notebook}: the budget moved from {low[0]:,.6g} to {high[0]:,.6g} but the chosen bits per layer "
        f"did not change: {bits_low}")
    assert sum(map(int, bits_low.values())) < sum(map(int, bits_high.values())), (
        f"{notebook}: the larger budget chose fewer bits in all: {bits_low} at {low[0]:,.6g}, {bits_high} at "
        f"{high[0]:,.6g}")
    return [start, low, high]


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
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        _run_all(page, notebook, console_errors)
        page.screenshot(path=str(SCREENSHOTS / f"{stem}-ran.png"), full_page=False)
        _no_news_popup(page, lab, notebook)
        # The cells below each explorer drove it from code: its controls must show those settings.
        explorers = _controls_match(page, notebook, "after Run All")
        assert explorers, f"{notebook}: no explorer reports what it shows (.nnlab-shown)"

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
                _fail_on_errors(page, notebook, console_errors)
                after = control.evaluate(_DRIVEN_STATE_JS)
                if after != before:
                    break
            page.screenshot(path=str(SCREENSHOTS / f"{stem}-control{i}-{kind}.png"))
            assert after != before, (
                f"{notebook}: moving control {i} ({kind}) did not change what the widget shows "
                f"within {MOVE_TIMEOUT_S} s")
            _controls_match(page, notebook, f"after moving control {i} ({kind})")
            moved.append(kind)
        assert moved, f"{notebook}: no visible control to move"

        # The budget explorer: its slider moved to both ends changes the chosen bits, and the choice follows it.
        budget_states = _check_budget_explorer(page, notebook, console_errors)
        src = json.loads((NOTEBOOK_DIR / notebook).read_text())
        if any("budget_explorer(" in "".join(c["source"]) for c in src["cells"] if c["cell_type"] == "code"):
            assert budget_states, f"{notebook}: calls budget_explorer but no budget slider rendered"

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
