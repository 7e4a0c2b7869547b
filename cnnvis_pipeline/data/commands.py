"""CLI commands of the data stage: `synth` (broden-synth), `download` (a Broden zip, resumed,
verified, unpacked), `validate` (every problem of a dataset) and `prepare` (packed arrays)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnnvis_pipeline.data.download import KNOWN_DATASETS, fetch_dataset
from cnnvis_pipeline.data.prepared import prepare_dataset
from cnnvis_pipeline.data.synth import generate_broden_synth
from cnnvis_pipeline.data.validate import validation_report
from cnnvis_pipeline.errors import CnnvisError


def _synth(args) -> int:
    generate_broden_synth(args.out, n_images=args.images, image_size=args.size, seed=args.seed)
    print(args.out)
    return 0


def _prepare(args) -> int:
    prepare_dataset(args.dataset, args.out, image_size=args.image_size, progress=not args.quiet)
    print(args.out)
    return 0


def _spec_from_json(args) -> dict:
    """`--spec`: the config's `dataset` mapping (what the workflow passes); --name names the dir."""
    if args.url or args.sha256 or args.md5:
        raise CnnvisError("download: give either --spec or --url/--sha256/--md5, not both")
    try:
        spec = json.loads(args.spec)
    except ValueError as e:
        raise CnnvisError(f"download: --spec is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise CnnvisError(f"download: --spec must be a JSON object, got {type(spec).__name__}")
    spec = {k: v for k, v in spec.items() if k in _SPEC_KEYS}
    if args.name:
        spec["name"] = args.name
    return spec


_SPEC_KEYS = ("download", "url", "mirror", "name", "md5", "sha256")


def _cmd_download(args) -> int:
    if args.spec:
        path = fetch_dataset(_spec_from_json(args), args.data_root, progress=not args.quiet)
        print(path)
        return 0
    if not args.name and not args.url:
        raise CnnvisError(
            f"download: give --name ({', '.join(KNOWN_DATASETS)}) or --url URL with --sha256 or "
            "--md5"
        )
    spec: dict[str, str] = {}
    if args.url:
        spec["url"] = args.url
    if args.name:
        spec["download" if args.name in KNOWN_DATASETS else "name"] = args.name
        if not args.url and args.name not in KNOWN_DATASETS:
            raise CnnvisError(
                f"download: unknown dataset {args.name!r}; known: {', '.join(KNOWN_DATASETS)} "
                "(for another archive give --url with --sha256 or --md5)"
            )
    if args.sha256:
        spec["sha256"] = args.sha256
    if args.md5:
        spec["md5"] = args.md5
    path = fetch_dataset(spec, args.data_root, progress=not args.quiet)
    print(path)
    return 0


def _cmd_validate(args) -> int:
    root = Path(args.dataset_dir)
    report = validation_report(root, progress=not args.quiet, workers=args.workers)
    if report.problems:
        for message in report.problems:
            print(message)
        n = len(report.problems)
        print(f"{root}: {n} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{v} {k}" for k, v in sorted(report.splits.items()))
    print(
        f"{root}: OK: {report.images} images ({splits}), {report.labels} labels, "
        f"{report.categories} categories, {report.files_checked} files checked"
    )
    return 0


def register(sub) -> None:
    def add(name: str, func, help_: str, description: str | None = None,
            quiet: str | None = None):
        p = sub.add_parser(name, help=help_, description=description)
        if quiet:
            p.add_argument("-q", "--quiet", action="store_true", help=quiet)
        p.set_defaults(func=func)
        return p

    p = add("synth", _synth, "generate a broden-synth dataset (Broden format)")
    p.add_argument("--out", required=True, help="directory to create (must not exist)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="image size in pixels (even)")
    p.add_argument("--seed", type=int, default=0)

    p = add("download", _cmd_download, "download, verify and unpack a Broden dataset",
            "Download a Broden-format zip (resuming a broken transfer), verify its checksum and "
            "unpack it safely into DATA_ROOT/NAME; prints the dataset's path.",
            quiet="no progress bars")
    p.add_argument("--data-root", type=Path, default=Path("resources"), help="default: resources")
    p.add_argument("--name", help=f"{', '.join(KNOWN_DATASETS)}, or the directory name for --url")
    p.add_argument("--url", help="a Broden-format zip, http(s):// or file:// (or a mirror of a "
                   "known one)")
    sums = p.add_mutually_exclusive_group()
    sums.add_argument("--sha256", help="expected sha256 of the zip")
    sums.add_argument("--md5", help="expected md5 of the zip")
    p.add_argument(
        "--spec",
        help="the config's dataset mapping as JSON (keys download, url, mirror, name, sha256, "
        "md5), as the workflow passes it; --name then only names the directory",
    )

    p = add("validate", _cmd_validate, "check a Broden-format dataset and list every problem",
            "Check a Broden-format dataset directory: CSVs, paths, image and PNG sizes, label "
            "numbers, corrupt files. Prints every problem and exits 1, or a one-line summary.",
            quiet="no progress bar")
    p.add_argument("dataset_dir", metavar="DATASET_DIR")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 8)")

    p = add("prepare", _prepare, "decode a Broden directory into packed arrays",
            quiet="no progress bar")
    p.add_argument("--dataset", required=True, help="Broden-format directory")
    p.add_argument("--out", required=True, help="prepared directory to create")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
