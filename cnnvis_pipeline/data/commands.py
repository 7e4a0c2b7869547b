"""CLI commands of the data stage: `synth` (broden-synth), `download` (a Broden zip, resumed,
verified, unpacked), `digest` (a dataset's content digest), `validate` (every problem of a
dataset) and `prepare` (packed arrays).

Shared entries under a data root are made under their lock, and one already complete for the
same content is success (data/entries.py); `--digest-out`/`--digest-file`/`--receipt` are the
per-run files the workflow's rules output instead of the shared entries."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnnvis_pipeline.data import entries
from cnnvis_pipeline.data.download import fetch_dataset
from cnnvis_pipeline.data.receipts import read_receipt, write_receipt
from cnnvis_pipeline.data.source import KNOWN_DATASETS
from cnnvis_pipeline.data.validate import summary_line, validation_report
from cnnvis_pipeline.errors import CnnvisError


def _digest_out(args, dataset) -> None:
    if args.digest_out:
        entries.write_dataset_digest(dataset, args.digest_out, manifest=args.manifest)


def _synth(args) -> int:
    out = entries.ensure_synth(args.out, images=args.images, size=args.size, seed=args.seed)
    _digest_out(args, out)
    print(out)
    return 0


def _digest(args) -> int:
    record = entries.write_dataset_digest(args.dataset, args.out, manifest=args.manifest)
    print(f"{args.dataset}: {record['digest']} ({record['files']} files, {record['bytes']} bytes)")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _prepare(args) -> int:
    if args.digest_file:
        if not (args.data_root and args.name and args.receipt) or args.out:
            raise CnnvisError("prepare: --digest-file needs --data-root, --name and --receipt "
                              "(and no --out)")
        digest = read_receipt(args.digest_file, "dataset-digest")["digest"]
        out = Path(args.data_root) / "prepared" / entries.entry_name(args.name, digest)
    elif args.out:
        from cnnvis_pipeline.data.manifest import dataset_digest

        if not Path(args.dataset).is_dir():
            raise CnnvisError(f"{args.dataset}: dataset directory does not exist")
        out, digest = Path(args.out), dataset_digest(args.dataset)["digest"]
    else:
        raise CnnvisError("prepare: give --out, or --digest-file with --data-root and --name")
    entries.ensure_prepared(args.dataset, out, digest=digest, image_size=args.image_size,
                            progress=not args.quiet, workers=args.workers)
    if args.receipt:
        write_receipt(args.receipt, "prepared", prepared=str(out), digest=digest)
    print(out)
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


_SPEC_KEYS = ("download", "url", "mirror", "name", "md5", "sha256", "max_expansion")


def _cmd_download(args) -> int:
    if args.spec:
        path = fetch_dataset(_spec_from_json(args), args.data_root, progress=not args.quiet,
                             max_expansion=args.max_expansion)
        _digest_out(args, path)
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
    path = fetch_dataset(spec, args.data_root, progress=not args.quiet,
                         max_expansion=args.max_expansion)
    _digest_out(args, path)
    print(path)
    return 0


def _cmd_validate(args) -> int:
    root = Path(args.dataset_dir)
    if args.digest_file:
        if not (args.data_root and args.name):
            raise CnnvisError("validate: --digest-file needs --data-root and --name")
        digest = read_receipt(args.digest_file, "dataset-digest")["digest"]
        problems, line = entries.ensure_validated(root, data_root=args.data_root, name=args.name,
                                                  digest=digest, workers=args.workers,
                                                  progress=not args.quiet)
    else:
        report = validation_report(root, progress=not args.quiet, workers=args.workers)
        problems = report.problems
        line = "" if problems else summary_line(root, report)
    if problems:
        for message in problems:
            print(message)
        n = getattr(problems, "total", len(problems))  # listed and counted (data/problems.py)
        print(f"{root}: {n:,} problem{'s' if n != 1 else ''}", file=sys.stderr)
        return 1
    print(line)
    return 0


def register(sub) -> None:
    def add(name: str, func, help_: str, description: str | None = None,
            quiet: str | None = None):
        p = sub.add_parser(name, help=help_, description=description)
        if quiet:
            p.add_argument("-q", "--quiet", action="store_true", help=quiet)
        p.set_defaults(func=func)
        return p

    def digest_out(p) -> None:
        p.add_argument("--digest-out", help="also write the dataset's digest file here (only "
                       "when it changes)")
        p.add_argument("--manifest", help="with --digest-out: the manifest cache (file stats "
                       "and hashes), so that only changed files are read again")

    p = add("synth", _synth, "generate a broden-synth dataset (Broden format)")
    p.add_argument("--out", required=True, help="directory to create (an existing broden-synth "
                   "dataset of the same parameters is taken as done)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="image size in pixels (even)")
    p.add_argument("--seed", type=int, default=0)
    digest_out(p)

    p = add("digest", _digest, "the content digest of a Broden directory, as a file that "
            "changes exactly when the content does")
    p.add_argument("--dataset", required=True, help="Broden-format directory")
    p.add_argument("--out", required=True, help="digest file to write (only when it changes)")
    p.add_argument("--manifest", help="manifest cache (file stats and hashes)")

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
        "md5, max_expansion), as the workflow passes it; --name then only names the directory",
    )
    p.add_argument("--max-expansion", type=float, default=None,
                   help="refuse an archive that unpacks to more than this many times its size "
                   "(default: the spec's max_expansion, else the schema's default)")
    digest_out(p)

    p = add("validate", _cmd_validate, "check a Broden-format dataset and list every problem",
            "Check a Broden-format dataset directory: CSVs, paths, image and PNG sizes, label "
            "numbers, corrupt files. Prints every problem and exits 1, or a one-line summary.",
            quiet="no progress bar")
    p.add_argument("dataset_dir", metavar="DATASET_DIR")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 8)")
    p.add_argument("--digest-file", help="the dataset's digest file (cnnvis digest): validate "
                   "once per content, recorded in DATA_ROOT/validated/NAME-<digest>.txt")
    p.add_argument("--data-root", help="with --digest-file: the shared data root")
    p.add_argument("--name", help="with --digest-file: the dataset's name")

    p = add("prepare", _prepare, "decode a Broden directory into packed arrays",
            quiet="no progress bar")
    p.add_argument("--dataset", required=True, help="Broden-format directory")
    p.add_argument("--out", default=None, help="prepared directory to create (one already "
                   "prepared from the same content is taken as done)")
    p.add_argument("--digest-file", help="the dataset's digest file: prepare into "
                   "DATA_ROOT/prepared/NAME-<digest> (shared by every run)")
    p.add_argument("--data-root", help="with --digest-file: the shared data root")
    p.add_argument("--name", help="with --digest-file: the dataset's name")
    p.add_argument("--receipt", help="write a receipt naming the prepared directory (what the "
                   "other commands' --prepared accepts)")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    p.add_argument("--workers", type=_positive, default=1, help="decoding processes (default 1; "
                   "the workflow passes the rule's threads); the arrays do not depend on it")
