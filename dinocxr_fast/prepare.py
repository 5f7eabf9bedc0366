"""``python -m dinocxr_fast.prepare SOURCE OUT``: decode and resize a dataset once, for the loaders.

SOURCE is an ImageFolder root (class folders, or train/ val/ test/ split folders of class folders),
a folder of images (unlabelled), or a CSV/TXT list (``--image-root``, ``--path-col``...); PNG 8/16-bit,
JPEG, DICOM and the other formats the loaders read. OUT becomes a prepared dataset: pass it as
``--data OUT`` to pretraining, fine-tuning, linear evaluation, evaluation or the kNN monitor.
``--verify OUT`` checks a prepared dataset (shapes, file sizes, pixel checksums). An interrupted
run resumes where it stopped when started again with the same arguments.
"""
from __future__ import annotations

import argparse
import os
import sys

from dinocxr_fast import cli
from dinocxr_fast.data.prepared import verify
from dinocxr_fast.data.prepared_write import Settings, default_short_side, describe, prepare
from dinocxr_fast.data.samples import DatasetError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinocxr_fast.prepare", description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", help="dataset folder or list file")
    p.add_argument("out", nargs="?", help="folder to write the prepared dataset to")
    p.add_argument("--verify", metavar="DIR", help="check a prepared dataset and exit (1 if anything is wrong)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    p.add_argument("--short-side", type=int, help="stored short side in pixels; default: --view-size / sqrt(--min-scale)")
    p.add_argument("--view-size", type=int, default=224, help="largest view the training will take (default 224)")
    p.add_argument("--min-scale", type=float, default=0.4, help="smallest random-resized-crop area scale of those views (0.4)")
    p.add_argument("--max-long-side", type=int, default=Settings.max_long_side, help="cap on the stored long side")
    p.add_argument("--max-pixels", type=int, default=Settings.max_pixels, help="inputs with more pixels are skipped as oversized")
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"))
    p.add_argument("--shard-images", type=int, default=Settings.shard_images, help="images per pixel file (resume unit)")
    p.add_argument("--unlabelled", action="store_true", help="ignore class folders: every image, no labels")
    p.add_argument("--image-root", help="list files: folder the listed paths are relative to (default: the list's)")
    p.add_argument("--path-col", default="filename", help="list files: column of the image paths")
    p.add_argument("--label-col", default="label", help="list files: column of the labels ('' for none)")
    p.add_argument("--patient-col", default="auto", help="list files: column of the patient ids ('' for none)")
    p.add_argument("--overwrite", action="store_true", help="replace a different prepared dataset in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify:
        problems = verify(args.verify)
        for line in problems[:50]:
            print(f"error: {line}", file=sys.stderr)
        if len(problems) > 50:
            print(f"error: ... and {len(problems) - 50} more", file=sys.stderr)
        print(f"{args.verify}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    if not args.source or not args.out:
        parser.error("SOURCE and OUT are required (or --verify DIR)")
    try:
        short = args.short_side or default_short_side(args.view_size, args.min_scale, cap=args.max_long_side)
        settings = Settings(short_side=short, max_long_side=args.max_long_side, max_pixels=args.max_pixels,
                            interpolation=args.interpolation, shard_images=args.shard_images)
        result = prepare(args.source, args.out, settings, workers=max(1, args.workers), progress=not args.quiet,
                         overwrite=args.overwrite, labelled=False if args.unlabelled else None, image_root=args.image_root,
                         path_col=args.path_col, label_col=args.label_col or None, patient_col=args.patient_col or None)
    except (DatasetError, ValueError) as e:
        return cli.user_error(e)
    from dinocxr_fast.data.prepared import PreparedDataset  # noqa: PLC0415

    skipped = PreparedDataset(result.root).skipped
    if skipped:
        print(describe(skipped))
    per_image = result.bytes / max(result.images, 1)
    rate = f", {result.images_per_s:.1f} images/s" if result.processed else " (already prepared)"
    print(f"{result.root}: {result.images} images ({per_image / 1024:.1f} KiB each, short side <= {short} px), "
          f"{result.skipped} skipped, {result.seconds:.1f} s{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
