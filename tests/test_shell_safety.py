"""No config value reaches a shell: hostile folder names are data, never commands.

The whole workflow (data, dissection, visualisation, reports) runs with a working directory, a
`data_root` and a `path:` dataset whose names hold spaces, `;`, `$(...)`, backticks, quotes and
`#`. The run must succeed, no planted command may run, and nothing outside results/ and the
data root may change.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

from cnnvis_pipeline.data.prepared import PreparedDataset

pytestmark = pytest.mark.slow


def hostile(tag: str) -> str:
    """A folder name that runs `touch PWNED_<tag>_*` if any shell ever sees it unquoted."""
    return (f"my data {tag};touch PWNED_{tag}_semi;#$(touch PWNED_{tag}_subst)"
            f"`touch PWNED_{tag}_tick`'q\"dq&&touch PWNED_{tag}_and")


def snapshot(root: Path, skip: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under root but those under `skip`: path -> (size, mtime_ns)."""
    skip = [s.resolve() for s in skip]
    out = {}
    for p in root.rglob("*"):
        rp = p.resolve() if not p.is_symlink() else p
        if any(rp == s or s in rp.parents for s in skip):
            continue
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def test_hostile_paths_are_never_run(tmp_path, synth_dir, workflow):
    base = tmp_path / "base dir ; $(x)"
    base.mkdir()
    work = base / hostile("work")
    data_root = base / hostile("root")
    dataset = base / hostile("ds")
    shutil.copytree(synth_dir, dataset)
    # a file beside the data root that `> {log}` with an unquoted space would truncate
    (base / "my").write_text("keep me\n")
    (base / "my data").mkdir()
    (base / "my data" / "keep.txt").write_text("keep me too\n")

    cfg = workflow.config("shell_safety")
    cfg["data_root"] = str(data_root)
    cfg["dataset"]["path"] = str(dataset)
    # (the run writes its own cfg.yaml: not part of what must stay untouched)
    skip = [work / "results", data_root, work / ".snakemake", work / "cfg.yaml"]
    before = snapshot(tmp_path, skip)

    proc = workflow.run(work, cfg, cwd=base)
    assert proc.returncode == 0, proc.stderr[-4000:]

    planted = [p for p in tmp_path.rglob("PWNED*")] + list(Path.cwd().glob("PWNED*"))
    assert planted == [], planted
    after = snapshot(tmp_path, skip)
    assert after == before
    assert (base / "my").read_text() == "keep me\n"

    units = pd.read_parquet(work / "results/tiny/features.relu4/units.parquet")
    assert list(units["unit"]) == list(range(8))  # relu4 of width 4: 8 units
    # the summary page links the model's report, and its layer anchors are in that report
    summary = (work / "results/summary/index.html").read_text()
    links = re.findall(r'<a class="model-report" href="([^"]+)">tiny</a>', summary)
    assert len(links) == 1, links
    report = (work / "results/summary" / unquote(links[0])).resolve()
    assert report == (work / "results/tiny/report/index.html").resolve()
    anchors = set(re.findall(r'href="[^"#]*#(layer-[^"]+)">tiny</a>', summary))
    assert anchors and all(f'id="{a}"' in report.read_text() for a in anchors), anchors
    # the prepared dataset the run used lies under the hostile data root, all 48 images of it
    ds = PreparedDataset(work / "results/digests/prepared.json")
    assert len(ds) == 48 and (data_root / "prepared").resolve() in ds.path.resolve().parents
