"""Validation of a dataset copied without its images: time and peak memory.

    python -m cnnvis_pipeline.bench.validation                 # 1,000,000 rows
    python -m cnnvis_pipeline.bench.validation --rows 200000
    python -m cnnvis_pipeline.bench.validation --rows 200000 --present 2   # no early stop

Writes a Broden directory whose category.csv and label.csv are broden-synth's and whose
index.csv has `--rows` rows naming an image and a segmentation PNG of every pixel-level
category, none of which exists (images/ is absent: the shape of a Broden copied without
`images/`); with `--present K` every K-th row names files that exist instead (one real image
and its segmentations, so those rows are also duplicates), which keeps validation from stopping
early: the whole index is checked and memory must stay flat. Then it runs `python -m cnnvis_pipeline validate DIR -q` as the workflow's rule does and
reports its wall time, its peak resident memory (the child's ru_maxrss), its exit status and
the line that says why it stopped. Prints figures and a JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_missing_dataset(out: Path, rows: int, present: int = 0) -> Path:
    """A Broden directory of `rows` index rows whose files are all missing (but every
    `present`-th row's, which names broden-synth's first image and its segmentations)."""
    from cnnvis_pipeline.data.synth import generate_broden_synth

    src = generate_broden_synth(out.parent / f".{out.name}-synth", 4, 16, seed=0)
    out.mkdir(parents=True)
    for name in ("category.csv", "label.csv"):
        shutil.copy(src / name, out / name)
    with (src / "index.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        header, first = list(reader.fieldnames or []), next(reader)
    pixel = [c for c in header if c not in ("image", "split", "ih", "iw", "sh", "sw")
             and first.get(c, "").endswith(".png")]
    if present:
        for rel in [first["image"]] + [r for c in pixel for r in first[c].split(";") if r]:
            (out / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "images" / rel, out / "images" / rel)
    shutil.rmtree(src)
    with (out / "index.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i in range(rows):
            if present and i % present == 0:
                w.writerow([first.get(c, "") for c in header])
                continue
            stem = f"ade20k/ADE_train_{i:08d}"
            cells = {"image": f"{stem}.jpg", "split": "train", "ih": 224, "iw": 224,
                     "sh": 112, "sw": 112}
            cells.update({c: f"{stem}_{c}.png" for c in pixel})
            w.writerow([cells.get(c, "") for c in header])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--present", type=int, default=0, help="every K-th row names files that "
                   "exist (default: none)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cnnvis-bench-validation-") as tmp:
        ds = write_missing_dataset(Path(tmp) / "broden-without-images", args.rows,
                                   args.present)
        size = (ds / "index.csv").stat().st_size
        which = f"every {args.present}th row's files present" if args.present else \
            "images/ absent"
        print(f"index.csv: {args.rows:,} rows, {size / 2**20:.1f} MiB; {which}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cnnvis_pipeline", "validate", str(ds),
                               "-q"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = proc.stdout.splitlines()
    why = next((ln for ln in lines if "seems missing" in ln), lines[-1] if lines else "")
    print(f"validate: exit {proc.returncode} in {wall:.1f} s, peak RSS {peak_mb:.0f} MB, "
          f"{len(lines)} lines printed; {proc.stderr.strip()}")
    print(f"  {why}")
    print(json.dumps({"rows": args.rows, "present": args.present, "exit": proc.returncode, "wall_s": round(wall, 2),
                      "peak_rss_mb": round(peak_mb), "lines": len(lines), "stopped": why}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
