"""FID of the same two image folders by this project, pytorch-fid, torch-fidelity and clean-fid, same weights.

    pip install torch-fidelity clean-fid
    python scripts/compare_fid_tools.py DIR1 DIR2 --inception-weights pt_inception-2015-12-05-6726825d.pth

No request is made: every tool gets the same weights file (torch-fidelity by path; pytorch-fid and clean-fid's
``legacy_pytorch`` mode through a temporary torch hub cache, where their downloader finds it). clean-fid's own
``clean`` mode runs a TorchScript Inception that cannot be built from this file, so its resizing (PIL bicubic on
float pixels, no re-quantisation) is measured with the pytorch-fid network instead. Prints one line per tool: the
FID and its relative difference to ours.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from samplers.evaluation import fid
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from samplers.evaluation import fid


def clean_fid_network(dims: int, device: torch.device):
    """clean-fid's ``legacy_pytorch`` feature extractor (pytorch-fid's network, no resize inside, input 0..255),
    at any of pytorch-fid's dims: clean-fid's own for 2048, the same construction pooled to 1x1 otherwise."""
    from cleanfid.features import feature_extractor
    from cleanfid.inception_pytorch import InceptionV3

    if dims == 2048:
        return feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
    model = InceptionV3(output_blocks=[InceptionV3.BLOCK_INDEX_BY_DIM[dims]], resize_input=False).to(device).eval()
    return lambda x: F.adaptive_avg_pool2d(model(x / 255)[0], 1).flatten(1)


def fids(dir1: str, dir2: str, weights: Path, device: str, batch_size: int, dims: int) -> dict[str, float]:
    """FID between the folders by each tool, all with the Inception weights file ``weights``."""
    import torch_fidelity
    from cleanfid import fid as clean_fid
    from pytorch_fid.fid_score import calculate_fid_given_paths

    dev = torch.device(device)
    common = {"device": dev, "num_workers": 0, "batch_size": batch_size, "verbose": False, "use_dataparallel": False}
    results = {
        "samplers (this project)": fid.fid_from_paths(
            dir1, dir2, weights=weights, dims=dims, device=device, batch_size=batch_size, offline=True
        )
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results["pytorch-fid"] = calculate_fid_given_paths([dir1, dir2], batch_size, device, dims, num_workers=0)
        results["torch-fidelity"] = torch_fidelity.calculate_metrics(
            input1=dir1,
            input2=dir2,
            fid=True,
            feature_extractor_weights_path=str(weights),
            feature_layer_fid=str(dims),
            cuda=dev.type == "cuda",
            cache=False,
            verbose=False,
            batch_size=batch_size,
        )["frechet_inception_distance"]
        network = clean_fid_network(dims, dev)
        for mode in ("legacy_pytorch", "clean"):
            name = f"clean-fid {mode}" + (" resize, pytorch-fid network" if mode == "clean" else "")
            results[name] = clean_fid.compute_fid(dir1, dir2, mode=mode, custom_feat_extractor=network, **common)
    return {name: float(value) for name, value in results.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs=2, help="two folders of images")
    parser.add_argument("--inception-weights", required=True, help=f"pytorch-fid's {fid.FID_WEIGHTS_FILENAME}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--dims", type=int, default=2048, choices=fid.FID_DIMS, help="Inception feature dims")
    args = parser.parse_args(argv)
    weights = Path(args.inception_weights).expanduser().resolve()
    if not weights.is_file():
        print(f"error: weights file not found: {weights}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home  # pytorch-fid's and clean-fid's downloader look here first
        checkpoints = Path(home) / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        (checkpoints / fid.FID_WEIGHTS_FILENAME).symlink_to(weights)
        results = fids(*args.dirs, weights, args.device, args.batch_size, args.dims)
    ours = results["samplers (this project)"]
    for name, value in results.items():
        print(f"{name:45s} FID {value:12.6f}   {(value - ours) / ours:+.2e} relative to ours")
    return 0


if __name__ == "__main__":
    sys.exit(main())
