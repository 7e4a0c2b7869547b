"""CLI commands of the data stage: `synth` (broden-synth) and `prepare` (packed arrays)."""

from __future__ import annotations

from cnnvis_pipeline.data.prepared import prepare_dataset
from cnnvis_pipeline.data.synth import generate_broden_synth


def _synth(args) -> int:
    generate_broden_synth(args.out, n_images=args.images, image_size=args.size, seed=args.seed)
    print(args.out)
    return 0


def _prepare(args) -> int:
    prepare_dataset(args.dataset, args.out, image_size=args.image_size, progress=not args.quiet)
    print(args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("synth", help="generate a broden-synth dataset (Broden format)")
    p.add_argument("--out", required=True, help="directory to create (must not exist)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="image size in pixels (even)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("prepare", help="decode a Broden directory into packed arrays")
    p.add_argument("--dataset", required=True, help="Broden-format directory")
    p.add_argument("--out", required=True, help="prepared directory to create")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)
