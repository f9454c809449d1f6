"""``dnfer report``: a self-contained HTML file, checked in a real headless Chromium.

The run directory comes from a real (tiny) ``fit`` on a planted-noise colour-coded folder dataset,
so metrics.jsonl, train_dynamics.npz and last.pt are exactly what the trainer writes. The browser
check needs Debian's ``chromium`` + ``chromium-driver`` (``make browser`` installs them); without
them the browser test is skipped with a loud reason.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image
from tests.conftest import COLOUR_CLASSES as CLASSES
from tests.conftest import colour_run_config, make_colour_dataset

from dnfer.analysis.report import CSP, render_report
from dnfer.cli import main as cli_main
from dnfer.config import Config
from dnfer.engine.trainer import fit

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: Headless flags that keep Chromium off the network (listed in docs/audit.md).
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900")
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    data = make_colour_dataset(tmp / "data", per_class=40)
    cfg = colour_run_config(data, tmp / "run", epochs=2)
    fit(cfg, log=lambda _m: None)
    return Path(cfg.out)


@pytest.fixture(scope="module")
def report(run_dir: Path) -> Path:
    assert cli_main(["report", str(run_dir), "--top", "24"]) == 0
    return run_dir / "report.html"


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert CSP in text
    # every src/href is an inline data: URI (no files, no network)
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)['"]""", text)
    assert refs, "report has no images"
    assert all(r.startswith("data:image/png;base64,") for r in refs), [r[:40] for r in refs if not r.startswith("data:")]
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    for section in ("Training curves", "Per-class thresholds", "Clean-sample selection", "Test set, last epoch",
                    "Label audit", "suspected mislabelled"):
        assert section in text, section
    # 24 thumbnails, each captioned given -> suggested with real class names
    captions = re.findall(r"<span class='given'>([^<]+)</span> &rarr; <span class='sugg'>([^<]+)</span>", text)
    assert len(captions) == 24
    assert all(g in CLASSES and s in CLASSES for g, s in captions)
    # every embedded PNG decodes
    for r in refs:
        raw = base64.b64decode(r.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_bad_run_dir_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.jsonl" in err and "\n" not in err


def test_report_without_images_falls_back_to_recorded_dynamics(run_dir: Path, tmp_path: Path) -> None:
    """A run whose data is gone still gets a report (no thumbnails, audit from recorded posteriors)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = json.loads(json.dumps(Config.from_yaml(copy / "config.yaml").to_dict()))
    assert cfg["data"]["spec"].startswith("folder:")
    from dnfer.engine.checkpoint import atomic_save, load_checkpoint

    for name in ("last.pt", "best.pt"):
        if (copy / name).exists():
            ck = load_checkpoint(copy / name)
            ck.config["data"]["spec"] = f"folder:{tmp_path / 'gone'}"
            atomic_save(ck, copy / name)
    out = render_report(copy, log=lambda _m: None)
    text = out.read_text()
    assert "Images unavailable" in text and "recorded dynamics only" in text


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        msg = (f"BROWSER TEST SKIPPED: {', '.join(missing)} not installed; run `make browser` "
               "(apt-get install chromium chromium-driver) to check the HTML report in a real browser")
        warnings.warn(msg, stacklevel=2)
        pytest.skip(msg)


def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        url = report.resolve().as_uri()
        driver.get_log("performance")  # drop the start-up new-tab page's internal chrome:// loads
        driver.get(url)
        assert driver.execute_script("return document.readyState") == "complete"
        imgs = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
        assert len(imgs) >= 24 + 5
        undecoded = [alt for complete, width, alt in imgs if not complete or width <= 0]
        assert not undecoded, f"images that did not decode: {undecoded}"
        console = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR", "WARNING")]
        assert not console, f"console messages: {console}"
        requests = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                requests.append((msg["params"].get("documentURL", ""), msg["params"]["request"]["url"]))
        assert any(u == url for _doc, u in requests), "the performance log did not record the page load"
        # a failure: anything the report page asks for besides itself and data: URIs, and any
        # request to a real network scheme from anywhere in the browser
        outside = [u for doc, u in requests if not (u.startswith("data:") or u == url)
                   and (doc == url or u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp"))]
        assert not outside, f"network requests: {outside}"
        # full-page screenshot
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1280, min(max(height, 900), 12000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        with Image.open(shot) as im:
            assert im.width >= 1000 and im.height >= 900
            # not a blank page: the plots and thumbnails give many distinct colours
            assert len(im.convert("RGB").resize((320, 320)).getcolors(1 << 16) or []) > 50
        docs_shot = os.environ.get("DNFER_REPORT_SCREENSHOT")
        if docs_shot:  # used once to refresh docs/img/report.png
            shutil.copy(shot, docs_shot)
    finally:
        driver.quit()


def test_warmup_line_comes_from_the_methods_params(tmp_path: Path) -> None:
    """Regression: the report read ``method.warmup_epochs`` (the layout before ``method.params``)
    and only for ``dnfer``, so no run's plots marked the end of the warm-up."""
    from dnfer.analysis.report import _warmup

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: dnfer_plus\n  params: {warmup_epochs: 3}\n")
    assert _warmup(run) == 3
    (run / "config.yaml").write_text("method:\n  name: dnfer\n")  # the default: the paper's 5
    assert _warmup(run) == 5
    (run / "config.yaml").write_text("method:\n  name: dnfer\n  warmup_epochs: 2\n")  # an older saved layout
    assert _warmup(run) == 2
    (run / "config.yaml").write_text("method:\n  name: ce\n")
    assert _warmup(run) is None
