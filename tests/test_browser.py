"""Notebook widgets in a real JupyterLab driven by a real browser (headless Chromium through selenium).

Starts JupyterLab from this Python on a free port (known token, its own config/runtime/workspace folders), opens
a copy of notebook 06 whose parameters point at a small store next to it, runs all cells from the browser and
checks what a user sees: every widget cell shows exactly one view and it is live (a slider or menu with its
figure), moving the gallery's page slider, the threshold slider and the cluster menu redraws the figure, no cell
shows an error or a stderr box. Debian's ``chromium`` and ``chromium-driver`` are used (``make browser-deps``);
nothing is downloaded. Screenshots of the galleries go to runs/test-artifacts/ (and ``$WORKBENCH_SCREENSHOTS``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_napari_qc.ipynb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _browser() -> tuple[str, str]:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver: make browser-deps")
    pytest.importorskip("selenium")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(fn, timeout: float, what: str, interval: float = 0.5):
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def save_png(png: bytes, name: str) -> Path:
    """Write a screenshot under runs/test-artifacts/ and, with WORKBENCH_SCREENSHOTS=DIR (``make screenshots``), DIR."""
    out = ROOT / "runs" / "test-artifacts" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    docs = os.environ.get("WORKBENCH_SCREENSHOTS")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        (Path(docs) / name).write_bytes(png)
    return out


def prepare_notebook(folder: Path, params: dict) -> Path:
    """Copy notebook 06 into ``folder`` with its parameters cell replaced by ``params``."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    out = folder / NOTEBOOK.name
    nbformat.write(nb, out)
    return out


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port serving a folder with a small store and a copy of notebook 06."""
    pytest.importorskip("jupyterlab")
    from test_qc import make_test_store

    folder = tmp_path_factory.mktemp("lab")
    make_test_store(folder)  # folder/ds.zarr: tiles, prefilter scores, a tree level, a sample
    prepare_notebook(
        folder,
        {
            "manifest": None,
            "store": "ds.zarr",
            "run_dir": "run",
            "slide_id": None,
            "column": None,
            "threshold": 0.75,
            "use_napari": False,
            "gallery_tiles": 16,
        },
    )
    home = tmp_path_factory.mktemp("lab-home")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "IPYTHONDIR": str(home / "ipython"),
        "XDG_CONFIG_HOME": str(home / "xdg"),
    }
    for k in [k for k in env if k.startswith("PAPERMILL_")] + ["MPLBACKEND"]:
        env.pop(k, None)
    port, token = _free_port(), "workbench-test-token"
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--ServerApp.token={token}",
            f"--ServerApp.root_dir={folder}",
            "--ServerApp.allow_root=True",
            "--LabApp.expose_app_in_browser=True",
            "--ServerApp.port_retries=0",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        import urllib.request

        def up():
            if proc.poll() is not None:
                raise RuntimeError("JupyterLab exited: " + (home / "lab.log").read_text()[-2000:])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
                return r.status == 200

        try:
            _wait(up, 90, "JupyterLab to answer")
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "folder": folder, "log": home / "lab.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


_KERNEL_STATUS = """
const app = window.jupyterapp; if (!app) return null;
const w = app.shell.currentWidget; if (!w || !w.sessionContext || !w.content) return null;
const k = w.sessionContext.session && w.sessionContext.session.kernel;
return k ? k.status : null;
"""

_CELLS = """
const nb = window.jupyterapp.shell.currentWidget.content;
return nb.widgets.map((c, i) => ({index: i, type: c.model.type, source: c.model.sharedModel.getSource(),
  count: c.model.type === 'code' ? c.model.executionCount : null,
  outputs: c.model.type === 'code' ? c.model.outputs.toJSON() : []}));
"""


def _cell_node(driver, index: int):
    return driver.execute_script(
        "const c = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]];"
        "c.node.scrollIntoView({block: 'start'}); return c.node;",
        index,
    )


_IMAGE_BYTES = """
const img = arguments[0].querySelector('.widget-vbox img'); const done = arguments[arguments.length - 1];
if (!img || !img.complete || !img.naturalWidth) { done(null); return; }
fetch(img.src).then(r => r.arrayBuffer()).then(buf => {
  const b = new Uint8Array(buf); let h = 0;
  for (let i = 0; i < b.length; i++) { h = (h * 31 + b[i]) >>> 0; }
  const tail = Array.from(b.slice(-8)).map(x => String.fromCharCode(x)).join('');
  done({bytes: b.length, hash: h, whole: tail.slice(0, 4) === 'IEND', width: img.naturalWidth});
}).catch(e => done(null));
"""


def _figure(driver, cell) -> dict | None:
    """The PNG inside a cell's widget view as the browser holds it: size, a hash, whether it is whole."""
    return driver.execute_async_script(_IMAGE_BYTES, cell)


def _screenshot(driver, index: int, name: str) -> Path:
    node = _cell_node(driver, index)
    time.sleep(1.0)  # let the output settle after scrolling
    return save_png(node.screenshot_as_png, name)


def _views(outputs: list) -> dict:
    """How many widget views and how many top-level images a cell's outputs hold."""
    data = [o.get("data", {}) for o in outputs if o.get("output_type") in ("display_data", "execute_result")]
    return {
        "widgets": sum(WIDGET_MIME in d for d in data),
        "images": sum("image/png" in d and WIDGET_MIME not in d for d in data),
    }


def test_notebook_06_widgets_are_live_in_jupyterlab(lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
    _wait(lambda: d.execute_script(_KERNEL_STATUS) == "idle", 120, "the notebook's kernel to be idle")
    cells = d.execute_script(_CELLS)
    n_code = sum(c["type"] == "code" for c in cells)
    t0 = time.monotonic()
    d.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")

    def finished():
        cs = d.execute_script(_CELLS)
        done = all(c["count"] is not None for c in cs if c["type"] == "code")
        return cs if done and d.execute_script(_KERNEL_STATUS) == "idle" else None

    cells = _wait(finished, 300, f"all {n_code} code cells to run")
    run_s = time.monotonic() - t0

    # no cell shows an error, and nothing reaches stderr (no INFO records, no loader noise)
    errors = [
        (c["index"], o.get("ename"), o.get("evalue"))
        for c in cells
        for o in c["outputs"]
        if o["output_type"] == "error"
    ]
    assert not errors, errors
    stderr = [
        (c["index"], o.get("text", "")[:300])
        for c in cells
        for o in c["outputs"]
        if o["output_type"] == "stream" and o.get("name") == "stderr"
    ]
    assert not stderr, stderr

    # each widget cell shows exactly one view, and it is a live widget (not a static figure, not text)
    def cell_with(text):
        (hit,) = [c for c in cells if c["type"] == "code" and text in c["source"]]
        return hit

    slider_cell, gallery_cell = cell_with("slider.show()"), cell_with("gallery.show()")
    cluster_cell = cell_with('by="cluster"')
    for c in (slider_cell, gallery_cell, cluster_cell):
        assert _views(c["outputs"]) == {"widgets": 1, "images": 0}, (c["source"], c["outputs"])
        texts = [o["data"].get("text/plain", "") for o in c["outputs"] if o.get("output_type") == "execute_result"]
        assert not any(t.startswith(("VBox(", "<Figure", "None")) for t in texts), texts  # not shown twice

    # the page slider of the gallery (tiles ranked by score) changes the gallery's image
    node = _cell_node(d, gallery_cell["index"])
    first = _wait(lambda: _figure(d, node), 60, "the gallery's figure")
    assert first["whole"] and first["bytes"] > 20_000 and first["width"] > 600  # 16 tiles drawn
    assert node.find_elements("css selector", ".widget-slider") and "Loading widget" not in node.text
    handle = node.find_element("css selector", ".widget-slider .noUi-handle")
    ActionChains(d).click(handle).send_keys(Keys.ARROW_RIGHT).perform()
    second = _wait(
        lambda: (f := _figure(d, node)) and f["hash"] != first["hash"] and f,
        60,
        "the gallery to redraw after the slider moved",
    )
    assert second["whole"] and second["bytes"] > 20_000
    readout = node.find_element("css selector", ".widget-readout").text.strip()
    assert readout == "1", readout  # page 1: the next 16 tiles by score
    _screenshot(d, gallery_cell["index"], "notebook_gallery.png")

    # the cluster gallery: another cluster from the menu, another image
    node = _cell_node(d, cluster_cell["index"])
    before = _wait(lambda: _figure(d, node), 60, "the cluster gallery's figure")
    menu = Select(node.find_element("css selector", ".widget-dropdown select"))
    assert len(menu.options) == 7  # tree/t1/level_1 has clusters 0..6
    menu.select_by_index(2)
    after = _wait(
        lambda: (f := _figure(d, node)) and f["hash"] != before["hash"] and f, 60, "the cluster gallery to redraw"
    )
    assert after["whole"] and after["bytes"] > 20_000
    _screenshot(d, cluster_cell["index"], "cluster_gallery.png")
    # the threshold slider redraws its histogram
    node = _cell_node(d, slider_cell["index"])
    before = _wait(lambda: _figure(d, node), 60, "the threshold histogram")
    handle = node.find_element("css selector", ".widget-slider .noUi-handle")
    value = float(node.find_element("css selector", ".widget-readout").text)
    ActionChains(d).click(handle).send_keys(Keys.ARROW_LEFT * 10).perform()  # ten quick redraws
    _wait(lambda: float(node.find_element("css selector", ".widget-readout").text) < value, 30, "the slider to move")
    time.sleep(3)
    after = _wait(
        lambda: (f := _figure(d, node)) and f["hash"] != before["hash"] and f,
        60,
        "the histogram to redraw after the slider moved",
    )
    assert after["whole"], after  # the last of many quick redraws arrives whole

    # the notebook's own results: labels written into the store next to the notebook
    metrics = json.loads((lab["folder"] / "run" / "06_metrics.json").read_text())
    assert metrics["labels_as_intended"] == 1.0 and metrics["session_edits"] == 2
    print(json.dumps({"notebook_run_s": round(run_s, 1), "code_cells": n_code}))
