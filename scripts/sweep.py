"""Resumable sampler sweep: model x solver x accelerator x guidance x NFE x seed block.

    python scripts/sweep.py --out DIR [--config grid.yaml] [--inception-weights FILE] [--device cuda] [--offline]
    torchrun --nproc_per_node 2 scripts/sweep.py --out DIR ...      (or: accelerate launch scripts/sweep.py ...)

With no --config it runs the embedded default grid (every registered solver x NFE 5/10/20 on exact-score
models; about a minute on 2 CPU cores). Rerunning the same command resumes: finished blocks are skipped.
Writes DIR/results.{csv,json,md}, DIR/plots/*.png, DIR/manifest.json, DIR/config_used.yaml, DIR/versions.json.
Hub models, Inception weights and CIFAR-10 are downloaded on first use; --offline (or HF_HUB_OFFLINE=1)
downloads nothing and names every missing file in one message.
User errors print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

try:
    from samplers.evaluation import downloads, fid, sweep
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samplers.evaluation import downloads, fid, sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    parser.add_argument("--config", help="grid spec YAML (default: the embedded grid; see configs/)")
    parser.add_argument("--inception-weights", help="pytorch-fid Inception weights file: adds Inception FID")
    parser.add_argument("--offline", action="store_true", default=None,
                        help="download nothing; name every missing file at once (default: on if HF_HUB_OFFLINE=1)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--nfe", type=int, nargs="+", help="override the grid's NFE list")
    parser.add_argument("--num-blocks", type=int, help="override seeds.num_blocks")
    parser.add_argument("--block-size", type=int, help="override seeds.block_size (samples per block)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="debug: each process stops after computing N blocks (resume by rerunning)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per process (default: $OMP_NUM_THREADS if set, else 1, as torchrun "
                             "does: the sweep's small batches gain little from threads and lose a lot on a busy CPU; "
                             "scale with processes instead)")
    return parser


def grid_from_args(args: argparse.Namespace) -> dict:
    raw = sweep.load_grid(args.config) if args.config else sweep.default_grid()
    if args.nfe is not None:
        raw["nfe"] = args.nfe
    seeds = dict(raw.get("seeds") or {})
    for key, value in (("num_blocks", args.num_blocks), ("block_size", args.block_size)):
        if value is not None:
            seeds[key] = value
    raw["seeds"] = seeds
    if args.inception_weights:
        raw["metric"] = {**(raw.get("metric") or {}), "inception_weights": args.inception_weights}
    return raw


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.stop_after is not None and args.stop_after < 1:
            raise sweep.SweepError(f"--stop-after must be >= 1, got {args.stop_after}")
        env_threads = os.environ.get("OMP_NUM_THREADS", "")
        threads = args.threads if args.threads is not None else int(env_threads) if env_threads.isdigit() else 1
        if threads < 1:
            raise sweep.SweepError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        sweep.run_sweep(grid_from_args(args), args.out, device=args.device, stop_after=args.stop_after,
                        offline=args.offline)
    except (sweep.SweepError, fid.FIDError, downloads.DownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
