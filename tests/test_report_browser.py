"""The reports of a tiny workflow run, opened in a real headless browser (Debian's chromium and
chromedriver, driven by selenium): every image loads, nothing is fetched from anywhere, the sort
buttons reorder the unit cards; the Methods values, every category of the dataset (per layer and
on the summary page, in one colour each) and the flags the tables call for are visible; the
summary's models x categories table sorts; `snakemake --report` works on the run. Full-page
screenshots of both pages are kept in results/browser-test/ (of the repository) for a person.

The workflow runs once per module: a 24-image 32-px broden-synth, a width-4 synthnet with random
weights, 8 activation-maximisation and 10 inversion steps (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "results" / "browser-test"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
LAYERS = ["features.relu3", "features.relu4"]

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def snakemake(workflow):
    def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        """`snakemake *args` on the run's workdir and its cfg.yaml (.test/config/report.yaml)."""
        proc = subprocess.run(workflow.cmd(workdir, *args), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode:
            print(proc.stdout[-4000:], proc.stderr[-4000:])
        return proc
    return snakemake


@pytest.fixture(scope="module")
def run(tmp_path_factory, workflow) -> Path:
    wd = tmp_path_factory.mktemp("report_run")
    proc = workflow.run(wd, workflow.config("report"), "--quiet", "rules")
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


def manifest_files(entry) -> set[str]:
    """The viz/ files a manifest entry names (keys ending in `file` / `files`)."""
    if isinstance(entry, dict):
        out = set()
        for k, v in entry.items():
            if k.endswith("file") and isinstance(v, str):
                out.add(v)
            elif k.endswith("files") and isinstance(v, list):
                out |= set(v)
            else:
                out |= manifest_files(v)
        return out
    if isinstance(entry, list):
        return set().union(*map(manifest_files, entry)) if entry else set()
    return set()


def test_workflow_outputs_and_snakemake_report(run, snakemake):
    import base64

    wd = run
    page = (wd / "results/tiny/report/index.html").read_text()
    for layer in LAYERS:
        viz = wd / f"results/tiny/{layer}/viz"
        manifest = json.loads((viz / "manifest.json").read_text())
        units = [c["unit"] for c in manifest["units"] if c["selected"]]
        table = pq.read_table(wd / f"results/tiny/{layer}/units.parquet").to_pandas()
        others = set(table.loc[table["detector"], "unit"]) - set(units)
        # every other detector has a card with its top images only
        assert {c["unit"] for c in manifest["units"] if not c["selected"]} == others
        assert all(set(c["views"]) == {"top_images"} for c in manifest["units"]
                   if not c["selected"])
        am = pd.read_parquet(wd / f"results/tiny/{layer}/activation_max.parquet")
        inv = pd.read_parquet(wd / f"results/tiny/{layer}/inversion.parquet")
        assert am["unit"].tolist() == units and len(inv) == 2
        # views.units = 4 highest IoUs, then the requested unit 7 of relu4
        assert len(units) == 4 + (layer == "features.relu4" and 7 not in units[:4])
        assert {p.name for p in viz.glob("*.png")} == manifest_files(manifest)
        section = page[page.index(f'id="layer-{layer.replace(".", "-")}"'):]
        section = section[:section.index("</section>")]
        cards = re.findall(r'<article class="card" id="[^"]+" data-unit="(\d+)"', section)
        assert sorted(map(int, cards)) == sorted(units + sorted(others))
    assert 7 in pd.read_parquet(wd / "results/tiny/features.relu4/activation_max.parquet")["unit"].tolist()
    figure = (wd / "results/tiny/report/iou_distribution.png").read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(figure).decode()}"' in page
    summary = (wd / "results/summary/index.html").read_text()
    assert 'href="../tiny/report/index.html"' in summary
    assert '<a class="summary-link" href="../../summary/index.html">' in page
    sizes = {p: (wd / p).stat().st_size for p in ("results/tiny/report/index.html",
                                                  "results/summary/index.html")}
    print("\nreport sizes (bytes):", sizes)
    proc = snakemake(wd, "--report", str(wd / "report.html"), timeout=300)
    assert proc.returncode == 0
    text = (wd / "report.html").read_text(errors="replace")
    # every figure of the report is there with the label its rule gives it
    for label in ("detectors per concept", "detectors against the IoU threshold",
                  "IoU per category", "unit visualisations", "unique detectors per category"):
        assert label in text, label


def planned(snakemake, wd: Path, config: dict) -> dict[str, int]:
    """rule -> jobs that a dry run with `config` plans on the finished run (cfg.yaml restored)."""
    import yaml

    cfg = wd / "cfg.yaml"
    original = cfg.read_text()
    try:
        cfg.write_text(yaml.safe_dump(config))
        proc = snakemake(wd, "--dry-run", timeout=300)
    finally:
        cfg.write_text(original)
    assert proc.returncode == 0
    jobs: dict[str, int] = {}
    for rule in re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M):
        if rule != "all":  # the default target, planned with anything else
            jobs[rule] = jobs.get(rule, 0) + 1
    return jobs


def test_a_display_setting_reruns_the_pages_only(run, snakemake, workflow):
    config = workflow.config("report")
    assert planned(snakemake, run, config) == {}  # the run is complete
    config["report"]["top_images"] = 3
    assert planned(snakemake, run, config) == {"model_report": 1, "summary_page": 1}
    # a view's own setting recomputes the views of every layer, nothing of the dissection
    config = workflow.config("report")
    config["views"]["activation_max"]["steps"] = 9
    assert planned(snakemake, run, config) == {"visualize_layer": 2, "model_report": 1,
                                               "summary_page": 1}


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


def screenshot(driver, path: Path) -> Path:
    """The whole page as one PNG (Chrome DevTools: beyond the viewport, at the page's size)."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 30000),
            "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "clip": clip})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width == int(clip["width"])
    return path


def visible(driver, css: str) -> list:
    """The elements matching `css` that a person sees: displayed, with a size and some text."""
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, css)
            if e.is_displayed() and e.size["width"] > 0 and e.size["height"] > 0]


def dataset_categories(wd: Path) -> list[str]:
    meta = next((wd / "resources" / "prepared").glob("*/meta.json"))
    return [c["name"] for c in json.loads(meta.read_text())["categories"]]


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
        print(f"\nscreenshot: {screenshot(driver, SHOTS / 'report_tiny.png')}")
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
        check_methods_categories_and_flags(driver, wd)
        check_units_table(driver, wd)
        check_deconvnet_tiles(driver)
        driver.find_element(By.CSS_SELECTOR, "a.summary-link").click()
        assert driver.title == "cnnvis summary"

        open_page(driver, wd / "results/summary/index.html")
        print(f"screenshot: {screenshot(driver, SHOTS / 'summary.png')}")
        check_summary(driver, wd)
        link = driver.find_element(By.CSS_SELECTOR, "a.model-report")
        assert link.text == "tiny"
        link.click()
        assert driver.title == "cnnvis report: tiny"
    finally:
        driver.quit()


def check_methods(driver, wd: Path, viz: bool = True) -> None:
    """The Methods section states the run's values, visibly."""
    [methods] = visible(driver, "#methods")
    text = methods.text
    meta = json.loads(next((wd / "resources" / "prepared").glob("*/meta.json")).read_text())
    want = [f"broden-synth-24x32-seed1: {meta['n_images']} images",
            f"{len(meta['categories'])} categories", f"{len(meta['concepts'])} concepts",
            "the 0.995 quantile (q = 0.005) of unit k's raw activations",
            "has IoU > 0.04", "per category, the number of distinct labels",
            "device cpu, precision fp32"]
    if viz:
        want += ["activation maximisation 8 steps at 32 px", "inversion of 2 images, 10 steps"]
    digest = pq.read_table(wd / f"results/tiny/{LAYERS[0]}/units.parquet").schema.metadata
    prov = json.loads(digest[b"cnnvis.provenance"])
    # the model's config digest (on the summary page: after the model's name)
    want.append(f"{'config digest' if viz else 'config digests: tiny'} {prov['config_digest'][:16]}")
    want.append(f"torch {prov['torch_version']}")
    for w in want:
        assert w in text, (w, text)
    assert "None" not in text


def check_methods_categories_and_flags(driver, wd: Path) -> None:
    from selenium.webdriver.common.by import By

    check_methods(driver, wd)
    cats = dataset_categories(wd)
    assert [e.get_attribute("data-category") for e in visible(driver, "#methods .category")] == cats
    colors = {}
    for layer in LAYERS:
        section = f"#layer-{layer.replace('.', '-')}"
        heads = visible(driver, f"{section} table.per-category th.category")
        assert [h.text for h in heads] == cats, layer  # every category, none dropped
        for h in heads:
            chip = h.find_element(By.CSS_SELECTOR, ".chip")
            colors.setdefault(h.text, set()).add(chip.value_of_css_property("background-color"))
        units = pq.read_table(wd / f"results/tiny/{layer}/units.parquet").to_pandas()
        am = pq.read_table(wd / f"results/tiny/{layer}/activation_max.parquet").to_pandas()
        low_am = set(am.loc[am["activation_ratio"] < 1, "unit"].astype(int))
        shown = [int(c.get_attribute("data-unit")) for c in visible(driver, f"{section} .card")]
        zero_t = set(units.loc[units["threshold"] <= 0, "unit"].astype(int))
        for u in shown:
            card = f"{section} .card[data-unit='{u}']"
            row = units[units["unit"] == u].iloc[0]
            label = visible(driver, f"{card} p.label")[0].text
            assert f"{row['concept']} ({row['category']}) IoU {row['iou']:.3f}" in label
            assert visible(driver, f"{card} .tk"), u  # T_k printed on every card
            flags = [e.text for e in visible(driver, f"{card} .flag.activity")]
            assert (flags != []) == (u in zero_t), (layer, u, flags)
            am_flags = visible(driver, f"{card} .flag.am-low")
            assert (am_flags != []) == (u in low_am), (layer, u)
            tiles = visible(driver, f"{card} .top-image")  # report.top_images
            assert len(tiles) == 5 and all(t.text.strip() for t in tiles)
            tops = visible(driver, f"{card} img.top")
            assert [t.size["height"] for t in tops] == [96] * 5  # 32-px images shown 3x
        flagged = [u for u in shown if u in zero_t or u in low_am]
        assert flagged, f"{layer}: the tiny run has no flagged unit to check"
    assert all(len(v) == 1 for v in colors.values()), colors  # one colour per category
    assert len({next(iter(v)) for v in colors.values()}) == len(cats)
    assert visible(driver, "#iou-distribution img.plot")


def check_summary(driver, wd: Path) -> None:
    from selenium.webdriver.common.by import By

    check_methods(driver, wd, viz=False)
    cats = dataset_categories(wd)
    assert [e.get_attribute("data-category") for e in visible(driver, "#methods .category")] == cats
    heads = visible(driver, "#models-categories th.category")
    assert [h.text for h in heads] == cats
    counts = pq.read_table(wd / "results/summary/detectors.parquet").to_pandas()
    rows = visible(driver, "#models-categories tbody tr")
    assert [(r.get_attribute("data-model"), r.get_attribute("data-layer")) for r in rows] == [
        ("tiny", layer) for layer in sorted(LAYERS)]
    for r in rows:
        g = counts[(counts["model"] == "tiny") & (counts["layer"] == r.get_attribute("data-layer"))]
        per_cat = g.set_index("category")["unique_detectors"]
        cells = [c.text for c in r.find_elements(By.CSS_SELECTOR, "td")][-len(cats):]
        assert cells == [str(int(per_cat.get(c, 0))) for c in cats]
    # the table sorts: by layer descending after two clicks on its header
    head = visible(driver, "#models-categories thead th")[1]
    head.click()
    head.click()
    assert head.get_attribute("aria-sort") == "descending"
    order = [r.get_attribute("data-layer") for r in visible(driver, "#models-categories tbody tr")]
    assert order == sorted(LAYERS, reverse=True)
    assert visible(driver, "a.table-link[href='detectors.parquet']")


def check_units_table(driver, wd: Path) -> None:
    """Every unit of units.parquet is a row of its layer's table with the table's values; every
    detector has a visible card the row links to; the filters show what they say."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from cnnvis_pipeline.reports.format import fmt, fmt_t

    for layer in LAYERS:
        tid = "units-" + layer.replace(".", "-")
        units = pq.read_table(wd / f"results/tiny/{layer}/units.parquet").to_pandas()
        rows = driver.find_elements(By.CSS_SELECTOR, f"#{tid} tbody tr")
        assert sorted(int(r.get_attribute("data-unit")) for r in rows) == sorted(units["unit"])
        by_unit = {int(r.get_attribute("data-unit")): r for r in rows}
        for u in units.itertuples():
            cells = by_unit[u.unit].find_elements(By.CSS_SELECTOR, "td")
            text = [c.get_attribute("textContent").strip() for c in cells]
            assert text[:4] == [str(u.unit), u.concept, u.category, fmt(u.iou)], (layer, text)
            assert text[-1] == fmt_t(u.threshold)
            if u.detector:
                link = cells[0].find_element(By.CSS_SELECTOR, "a").get_attribute("href")
                card = f"{layer.replace('.', '-')}-unit-{u.unit}"
                assert link.endswith(f"#{card}")
                assert visible(driver, f"#{card}"), (layer, u.unit)
        show = Select(driver.find_element(By.CSS_SELECTOR, f'select.units-show[data-table="{tid}"]'))
        show.select_by_value("detector")
        shown = [int(r.get_attribute("data-unit")) for r in visible(driver, f"#{tid} tbody tr")]
        assert sorted(shown) == sorted(units.loc[units["detector"], "unit"]), layer
        show.select_by_value("all")
        concept = str(units["concept"].iloc[0])
        box = driver.find_element(By.CSS_SELECTOR, f'input.units-filter[data-table="{tid}"]')
        box.send_keys(concept)
        shown = visible(driver, f"#{tid} tbody tr")
        assert shown and all(concept in r.text for r in shown)
        assert len(shown) >= int((units["concept"] == concept).sum())
        box.clear()
        box.send_keys(" ")  # an input event: every row again
        assert len(visible(driver, f"#{tid} tbody tr")) == len(units)


def check_deconvnet_tiles(driver) -> None:
    """DeconvNet strips: tiles shown at 96 px or more, and the projections (bottom row) are not
    uniform grey: the pixel standard deviation of the row as the browser draws it."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    # a dead unit's projection is zero: grey is right there
    strips = [img for card in visible(driver, ".card") if not card.find_elements(
        By.CSS_SELECTOR, ".flag.dead") for img in card.find_elements(By.CSS_SELECTOR, "img.deconv")]
    assert strips
    for img in strips[:6]:
        tile = int(img.get_attribute("data-tile"))
        scale = img.size["height"] / img.get_property("naturalHeight")
        assert tile * scale >= 96, (tile, scale)
        driver.execute_script("arguments[0].scrollIntoView()", img)
        shot = np.asarray(Image.open(io.BytesIO(img.screenshot_as_png)).convert("L"), np.float64)
        bottom = shot[shot.shape[0] // 2 + 4:, : int(tile * scale)]  # the first projection tile
        assert bottom.size and bottom.std() > 12, bottom.std()
