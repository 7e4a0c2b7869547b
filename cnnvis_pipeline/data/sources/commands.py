"""CLI commands of the data sources (data/sources/): `source-digest` (the content digest of a
source's files with its options), `source-validate` (every problem at once) and
`source-prepare` (the packed arrays). Each takes the config's `dataset` mapping as `--spec`
JSON; the shared entries and per-run files are those of data/commands.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnnvis_pipeline.data.entries import entry_name
from cnnvis_pipeline.data.receipts import read_receipt, write_receipt
from cnnvis_pipeline.errors import CnnvisError


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except ValueError as e:
        raise CnnvisError(f"--spec is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise CnnvisError(f"--spec must be a JSON object, got {type(spec).__name__}")
    return spec


def _digest(args) -> int:
    from cnnvis_pipeline.data.sources import write_source_digest

    record = write_source_digest(_spec(args.spec), args.out, manifests=args.manifests,
                                 name=args.name or "")
    print(f"{record['digest']} ({record['files']} files, {record['bytes']} bytes)")
    return 0


def _validate(args) -> int:
    from cnnvis_pipeline.data.sources.prepare import ensure_source_validated, validate_source

    spec = _spec(args.spec)
    if args.digest_file:
        if not (args.data_root and args.name):
            raise CnnvisError("source-validate: --digest-file needs --data-root and --name")
        digest = read_receipt(args.digest_file, "dataset-digest")["digest"]
        problems, line = ensure_source_validated(spec, data_root=args.data_root, name=args.name,
                                                 digest=digest, workers=args.workers)
    else:
        problems, line = validate_source(spec, workers=args.workers)
    if problems:
        for message in problems:
            print(message)
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        return 1
    print(line)
    return 0


def _prepare(args) -> int:
    from cnnvis_pipeline.data.sources import source_digest
    from cnnvis_pipeline.data.sources.prepare import ensure_source_prepared, prepared_digest

    spec, directory = _spec(args.spec), args.directory or None
    if args.digest_file:
        if not (args.data_root and args.name and args.receipt) or args.out:
            raise CnnvisError("source-prepare: --digest-file needs --data-root, --name and "
                              "--receipt (and no --out)")
        digest = prepared_digest(spec, read_receipt(args.digest_file, "dataset-digest")["digest"])
        out = Path(args.data_root) / "prepared" / entry_name(args.name, digest)
    elif args.out:
        if directory:
            from cnnvis_pipeline.data.manifest import dataset_digest

            content = dataset_digest(directory)["digest"]
        else:
            content = source_digest(spec)["digest"]
        out, digest = Path(args.out), prepared_digest(spec, content)
    else:
        raise CnnvisError("source-prepare: give --out, or --digest-file with --data-root and "
                          "--name")
    ensure_source_prepared(spec, out, digest=digest, workers=args.workers,
                           progress=not args.quiet, directory=directory,
                           predictions=args.predictions)
    if args.receipt:
        write_receipt(args.receipt, "prepared", prepared=str(out), digest=digest)
    print(out)
    return 0


def register(sub) -> None:
    spec_help = "the config's `dataset` mapping as JSON (docs/DATA_SOURCES.md)"
    p = sub.add_parser("source-digest", help="the content digest of a dataset source's files "
                       "and options, as a digest file")
    p.add_argument("--spec", required=True, help=spec_help)
    p.add_argument("--out", required=True, help="digest file to write (only when it changes)")
    p.add_argument("--manifests", help="a directory of manifest caches (file stats and hashes)")
    p.add_argument("--name", help="the dataset's name (recorded in the digest file)")
    p.set_defaults(func=_digest)

    p = sub.add_parser("source-validate", help="check a dataset source and list every problem")
    p.add_argument("--spec", required=True, help=spec_help)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 8)")
    p.add_argument("--digest-file", help="the source's digest file: validate once per content")
    p.add_argument("--data-root", help="with --digest-file: the shared data root")
    p.add_argument("--name", help="with --digest-file: the dataset's name")
    p.set_defaults(func=_validate)

    p = sub.add_parser("source-prepare", help="decode a dataset source into packed arrays")
    p.add_argument("--spec", required=True, help=spec_help)
    p.add_argument("--directory", help="the Broden directory of a synth/download/path dataset (empty: none)")
    p.add_argument("--out", default=None, help="prepared directory to create")
    p.add_argument("--digest-file", help="the dataset's digest file: prepare into "
                   "DATA_ROOT/prepared/NAME-<digest> (shared by every run)")
    p.add_argument("--data-root", help="with --digest-file: the shared data root")
    p.add_argument("--name", help="with --digest-file: the dataset's name")
    p.add_argument("--receipt", help="write a receipt naming the prepared directory")
    p.add_argument("--predictions", nargs="*", default=None, help="a segmenter's output "
                   "directories (cnnvis segment), one per shard, in order")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)
