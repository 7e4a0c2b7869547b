"""The reports of a tiny workflow run, opened in a real headless browser (Debian's chromium and
chromedriver, driven by selenium): every image loads, nothing is fetched from anywhere, the sort
buttons reorder the unit cards; and `snakemake --report` works on the run.

The workflow runs once per module: a 24-image 32-px broden-synth, a width-4 synthnet with random
weights, 8 activation-maximisation and 10 inversion steps (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
LAYERS = ["features.relu3", "features.relu4"]

pytestmark = pytest.mark.slow

CONFIG = {
    "dataset": {"synth": {"images": 24, "size": 32, "seed": 1}},
    "models": {
        "tiny": {"arch": "synthnet", "kwargs": {"width": 4}, "layers": LAYERS,
                 "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                 "units": {"features.relu4": [7]}},
    },
    "dissection": {"shards": 1, "batch_size": 8, "top_k": 5, "device": "cpu"},
    "reports": {"top_units": 4, "top_images": 5, "activation_max": {"steps": 8, "size": 32},
                "inversion": {"images": 2, "steps": 10, "spread_images": 8}},
}


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args, "--configfile", str(workdir / "cfg.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("report_run")
    (wd / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    proc = snakemake(wd, "--quiet", "rules")
    assert proc.returncode == 0, "the tiny workflow failed (see the captured output)"
    return wd


def expected_orders(wd: Path, layer: str) -> dict[str, list[int]]:
    """The three orders of the visualised units of one layer, from the tables."""
    units = pq.read_table(wd / f"results/tiny/{layer}/units.parquet").to_pandas()
    manifest = json.loads((wd / f"results/tiny/{layer}/viz/manifest.json").read_text())
    shown = units[units["unit"].isin([c["unit"] for c in manifest["units"]])]
    rows = [(int(r.unit), float(r.iou), str(r.concept)) for r in shown.itertuples()]
    return {
        "iou": [u for u, i, _ in sorted(rows, key=lambda r: (-r[1], r[0]))],
        "unit": sorted(u for u, _, _ in rows),
        "label": [u for u, _, _ in sorted(rows, key=lambda r: (r[2], -r[1], r[0]))],
    }


def test_workflow_outputs_and_snakemake_report(run):
    wd = run
    for layer in LAYERS:
        am = pd.read_parquet(wd / f"results/tiny/{layer}/activation_max.parquet")
        inv = pd.read_parquet(wd / f"results/tiny/{layer}/inversion.parquet")
        assert len(am) >= 4 and len(inv) == 2
        assert sorted(p.name for p in (wd / f"results/tiny/{layer}/viz").glob("*.png"))
    assert 7 in pd.read_parquet(wd / "results/tiny/features.relu4/activation_max.parquet")["unit"].tolist()
    assert (wd / "results/tiny/report/index.html").stat().st_size > 10_000
    assert (wd / "results/tiny/report/iou_distribution.png").is_file()
    assert (wd / "results/summary/index.html").is_file()
    proc = snakemake(wd, "--report", str(wd / "report.html"), timeout=300)
    assert proc.returncode == 0
    text = (wd / "report.html").read_text(errors="replace")
    assert "index.html" in text and "iou_distribution.png" in text


def make_driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(120)
    return driver


def open_page(driver, path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert images, f"{path}: no images"
    broken = [alt for complete, width, alt in images if not complete or width <= 0]
    assert not broken, f"{path}: images that did not load: {broken}"
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched == [], f"{path}: the page fetched {fetched}"
    return images


def card_order(driver, grid_id: str) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.getElementById(arguments[0]).querySelectorAll(':scope > .card'))"
        ".map(c => +c.dataset.unit)", grid_id)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="chromium and chromedriver are not installed "
                           "(apt-get install chromium chromium-driver)")
def test_report_in_headless_chromium(run, tmp_path):
    from selenium.webdriver.common.by import By

    wd = run
    driver = make_driver(tmp_path / "profile")
    try:
        open_page(driver, wd / "results/tiny/report/index.html")
        assert driver.title == "cnnvis report: tiny"
        for layer in LAYERS:
            grid = "grid-" + layer.replace(".", "-")
            want = expected_orders(wd, layer)
            assert card_order(driver, grid) == want["iou"]  # as written
            buttons = {b.get_attribute("data-key"): b for b in driver.find_elements(
                By.CSS_SELECTOR, f'button.sort[data-grid="{grid}"]')}
            assert set(buttons) == {"iou", "unit", "label"}
            for key in ("unit", "label", "iou", "label"):
                buttons[key].click()
                assert card_order(driver, grid) == want[key], (layer, key)
                assert buttons[key].get_attribute("aria-pressed") == "true"
                assert [b.get_attribute("aria-pressed") for k, b in buttons.items()
                        if k != key] == ["false", "false"]
            # the first card's heading moved with it (the DOM is reordered, not relabelled)
            first = driver.find_element(By.CSS_SELECTOR, f"#{grid} > .card h4")
            assert first.text.startswith(f"unit {want['label'][0]}")
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors

        open_page(driver, wd / "results/summary/index.html")
        link = driver.find_element(By.CSS_SELECTOR, "a.model-report")
        assert link.text == "tiny"
        link.click()
        assert driver.title == "cnnvis report: tiny"
    finally:
        driver.quit()
