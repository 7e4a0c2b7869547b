"""The speed benchmark: `python -m cnnvis_pipeline.bench` (see benchmarks/README.md).

- bench.py: the benchmark itself (load, forward and whole-dissection timings, peak memory).
- bigsynth.py: broden-big, the generator of its large Broden-format dataset.
- workflow.py: the same dissection through the Snakemake workflow (--workflow), bulk audits.
- zoo.py: every torchvision classification architecture dissected at a small input
  (`python -m cnnvis_pipeline.bench.zoo`; the table is benchmarks/zoo.md).

Importing this package imports neither torch nor the workflow's dependencies.
"""

from cnnvis_pipeline.bench.bench import (
    DEFAULT_CACHE,
    dataset_dirs,
    ensure_dataset,
    main,
    parse_args,
    run,
)

__all__ = ["DEFAULT_CACHE", "dataset_dirs", "ensure_dataset", "main", "parse_args", "run"]
