"""FID between two image sources, with pytorch-fid's CLI.

    python scripts/fid.py PATH1 PATH2 [--dims 2048] [--batch-size 100] [--device cuda]
                          [--inception-weights FILE] [--offline]
    python scripts/fid.py samples_dir cifar10-train
    python scripts/fid.py --save-stats INPUT OUTPUT.npz

Each PATH is a folder of images, a stats ``.npz`` (``mu``, ``sigma``), an ``.npz`` of uint8 NHWC images (key
``images`` or ``arr_0``), ``cifar10:ROOT`` / ``cifar10-test:ROOT`` for torchvision's CIFAR-10 already
extracted under ROOT, or a reference name, ``cifar10-train`` / ``cifar10-test`` (stats computed once from
CIFAR-10 and cached). The weights default to pytorch-fid's file in the torch hub cache. Missing files are
downloaded on first use; with --offline (or HF_HUB_OFFLINE=1) nothing is, and one message names every missing
file and where to put it. The last line printed is ``FID: <value>``. User errors print to stderr (one line, or
the list of missing files) and exit with code 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

try:
    from samplers.evaluation import downloads, fid
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samplers.evaluation import downloads, fid


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (pytorch-fid's options plus ``--inception-weights`` and ``--offline``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-size", type=int, default=100, help="images per Inception forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="accepted for pytorch-fid compatibility; images are decoded in the main process",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:0 or cpu (default: cuda if available)")
    parser.add_argument(
        "--dims",
        type=int,
        default=2048,
        choices=fid.FID_DIMS,
        help="Inception feature dimensionality (default: %(default)s)",
    )
    parser.add_argument(
        "--save-stats",
        action="store_true",
        help="write the stats of the first path to the second (a new .npz file) instead of computing FID",
    )
    parser.add_argument(
        "--inception-weights",
        metavar="FILE",
        default=None,
        help=f"pytorch-fid's {fid.FID_WEIGHTS_FILENAME} (default: {fid.default_weights_path()})",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help="download nothing; name every missing file at once (default: on if HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "path", nargs=2, help="folders of images, .npz stats/images, cifar10:ROOT, or cifar10-train / cifar10-test"
    )
    return parser


def save_stats(source: str, output: str, args: argparse.Namespace) -> None:
    """Compute the stats of ``source`` and write them to the new file ``output``."""
    out = Path(output)
    if out.suffix.lower() != ".npz":
        raise fid.FIDError(f"the output stats file must end in .npz: {out}")
    if out.exists():
        raise fid.FIDError(f"output file already exists: {out}")
    if not out.parent.is_dir():
        raise fid.FIDError(f"output folder does not exist: {out.parent}")
    offline = downloads.is_offline(args.offline)
    named = source in fid.REFERENCE_STATS
    if offline and named:
        downloads.require(fid.missing_inputs(args.inception_weights, args.dims, [source]))
    model = fid.load_fid_inception(args.inception_weights, args.dims, args.device, offline)
    if named:  # the cached reference stats (computed now if need be), copied
        fid.reference_stats(source, model, args.batch_size, offline)
        shutil.copyfile(fid.reference_stats_path(source, args.dims, model.weights_sha256), out)
        print(f"Saved {source} stats ({args.dims} dims) to {out}")
        return
    stats = fid.stats_from_path(source, model, args.batch_size, offline)
    stats.to_npz(out)
    print(f"Saved stats of {stats.count} images from {source} ({args.dims} dims) to {out}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise fid.FIDError(f"--batch-size must be positive, got {args.batch_size}")
        if args.save_stats:
            save_stats(*args.path, args)
            return 0
        value = fid.fid_from_paths(
            *args.path,
            weights=args.inception_weights,
            dims=args.dims,
            batch_size=args.batch_size,
            device=args.device,
            offline=args.offline,
        )
    except (fid.FIDError, downloads.DownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"FID: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
