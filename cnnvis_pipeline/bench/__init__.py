"""The speed benchmark: `python -m cnnvis_pipeline.bench` (see benchmarks/README.md).

- bench.py: the benchmark itself (load, forward and whole-dissection timings, peak memory).
- common.py: the dataset cache, peak resident memory and device names the benchmarks share.
- measures.py: detectors, activation size and the device-vs-CPU tally check of bench.py.
- bigsynth.py: broden-big, the generator of its large Broden-format dataset.
- workflow.py: the same dissection through the Snakemake workflow (--workflow), bulk audits.
- zoo.py: every torchvision classification architecture dissected at a small input
  (`python -m cnnvis_pipeline.bench.zoo`; the table is benchmarks/zoo.md).

Importing this package imports neither torch nor the workflow's dependencies.
"""

from cnnvis_pipeline.bench.bench import main, parse_args, run
from cnnvis_pipeline.bench.common import DEFAULT_CACHE, dataset_dirs, ensure_dataset

__all__ = ["DEFAULT_CACHE", "dataset_dirs", "ensure_dataset", "main", "parse_args", "run"]
