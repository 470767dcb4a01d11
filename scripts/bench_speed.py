"""Speed benchmark on whatever device is present: the model alone, the solver overhead alone, and end-to-end
sampling, for the project's schedulers vs diffusers' own, with a CIFAR-size `UNet2DModel` (random weights).

    python scripts/bench_speed.py [--batch 256] [--nfe 10] [--dtype bf16] [--compile] [--channels-last]

Prints medians (ms) and ratios, writes results.json / results.csv into --out. Solver overhead is measured with
precomputed model outputs (no model, set_timesteps included), end to end with the real UNet; the overhead share
is solver time / (solver time + NFE x model time), an upper bound on CUDA: there the solver's host work overlaps
the model's GPU work unless the solver syncs, so only its kernels (and its syncs) add to a run. Timings synchronize
only around each run. On CUDA, ours is also timed as a `samplers.CapturedSampler` (the whole loop replayed from one
CUDA graph: no host work at all between steps).

Host overhead: the same solver loop on 1x1x1x1 CPU tensors (arithmetic negligible), i.e. the Python and dispatch
time per run - what a GPU run pays on top of its kernels when the host cannot run ahead (every host sync).

Counted with a TorchDispatchMode over one solver loop: aten ops per step (a proxy for kernel launches) and host
reads per run - ops whose result the host waits for (item/nonzero/equal) and host<->device copies. On CUDA only
reads of CUDA tensors count: each is a sync that stalls the GPU pipeline. On CPU every read of a tensor value
counts, an upper bound on the syncs the same code makes on a GPU (diffusers keeps some tables on the host).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel
from torch.utils._python_dispatch import TorchDispatchMode

import samplers
from samplers.evaluation.sweep import write_csv

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: aten ops whose result the host has to wait for
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_dim"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside the context and the host reads among them (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.on_cpu = device.type == "cpu"
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops += 1
        devices = {a.device.type for a in (*args, out) if isinstance(a, torch.Tensor)}
        if name in SYNC_OPS and (self.on_cpu or devices - {"cpu"}):
            self.reads += 1
        elif name in ("_to_copy", "copy_") and "cpu" in devices and len(devices) > 1:
            self.reads += 1
        return out


def count_ops(fn: Callable[[], object], device: torch.device, steps: int) -> tuple[float, int]:
    """(aten ops per step, host reads per run) of ``fn``."""
    with OpCounter(device) as counter:
        fn()
    return counter.ops / steps, counter.reads


def cifar_unet() -> UNet2DModel:
    """The google/ddpm-cifar10-32 architecture (35.7M parameters), randomly initialised."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in ms of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def solver_loop(scheduler, outputs: list[torch.Tensor], x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        scheduler.set_timesteps(len(outputs), device=x.device)
        y = x
        for t, out in zip(scheduler.timesteps, outputs):
            y = scheduler.step(out, t, y).prev_sample
        return y

    return run


def host_overhead(scheduler, nfe: int, repeats: int) -> float:
    """Median ms of a ``nfe``-step solver loop (set_timesteps included) on 1x1x1x1 CPU tensors."""
    x = torch.zeros(1, 1, 1, 1)
    outputs = [torch.full((1, 1, 1, 1), 0.1 * k) for k in range(nfe)]
    return timed(solver_loop(scheduler, outputs, x), torch.device("cpu"), max(repeats, 20))


def sampling_loop(scheduler, model: Callable, x: torch.Tensor, nfe: int,
                  memory_format: torch.memory_format) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        return samplers.sample(model, scheduler, x, nfe, memory_format=memory_format).samples

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/bench_speed"))
    parser.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="model dtype (default bf16 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)

    unet = cifar_unet().to(device=device, dtype=dtype).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    forward = torch.compile(unet) if args.compile else unet

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return forward(x.to(dtype=dtype, memory_format=memory_format), t).sample

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    t = torch.tensor(500, device=device)
    model_ms = timed(lambda: model(x, t), device, args.repeats)
    outputs = [torch.randn(batch, 3, 32, 32, generator=g).to(device, dtype) for _ in range(args.nfe)]

    rows = []
    header = (f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
              f"batch={batch}, model dtype={dtype}, compile={args.compile}, channels_last={args.channels_last}, "
              f"NFE={args.nfe}; model forward median {model_ms:.2f} ms")
    print(header)
    captures = device.type == "cuda"
    print("| solver | ours solver ms | diffusers solver ms | ratio | ours share of run | diffusers share | "
          "ours end-to-end ms | diffusers end-to-end ms | ratio | ours captured ms | ops/step ours / diffusers | "
          "host reads/run ours / diffusers | host ms/run ours / diffusers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (ours_name, ours_opts), (theirs_name, theirs_opts) in samplers.DIFFUSERS_PEERS:
        if ours_name not in samplers.SCHEDULERS:
            continue
        ours = samplers.SCHEDULERS[ours_name](**ours_opts)
        theirs = getattr(diffusers, theirs_name)(**theirs_opts)
        s_ours = timed(solver_loop(ours, outputs, x), device, args.repeats)
        s_theirs = timed(solver_loop(theirs, outputs, x), device, args.repeats)
        e_ours = timed(sampling_loop(ours, model, x, args.nfe, memory_format), device, args.repeats)
        e_theirs = timed(sampling_loop(theirs, model, x, args.nfe, memory_format), device, args.repeats)
        c_ours = float("nan")
        if captures:
            captured = samplers.CapturedSampler(model, samplers.SCHEDULERS[ours_name](**ours_opts), x.shape,
                                                args.nfe, device=device, memory_format=memory_format)
            c_ours = timed(functools.partial(captured, x), device, args.repeats)
        ops_ours, reads_ours = count_ops(solver_loop(ours, outputs, x), device, args.nfe)
        ops_theirs, reads_theirs = count_ops(solver_loop(theirs, outputs, x), device, args.nfe)
        host_ours, host_theirs = host_overhead(ours, args.nfe, args.repeats), host_overhead(theirs, args.nfe,
                                                                                             args.repeats)
        share = [s / (s + args.nfe * model_ms) for s in (s_ours, s_theirs)]
        row = dict(solver=label, device=str(device), batch=batch, dtype=str(dtype), compile=args.compile,
                   nfe=args.nfe, model_ms=model_ms, ours_solver_ms=s_ours, diffusers_solver_ms=s_theirs,
                   solver_ratio=s_ours / s_theirs, ours_share=share[0], diffusers_share=share[1],
                   ours_end_to_end_ms=e_ours, diffusers_end_to_end_ms=e_theirs, end_to_end_ratio=e_ours / e_theirs,
                   ours_captured_ms=c_ours, ours_ops_per_step=ops_ours, diffusers_ops_per_step=ops_theirs,
                   ours_host_reads_per_run=reads_ours, diffusers_host_reads_per_run=reads_theirs,
                   ours_host_ms=host_ours, diffusers_host_ms=host_theirs)
        rows.append(row)
        print(f"| {label} | {s_ours:.2f} | {s_theirs:.2f} | {s_ours / s_theirs:.2f} | {share[0]:.2%} | "
              f"{share[1]:.2%} | {e_ours:.1f} | {e_theirs:.1f} | {e_ours / e_theirs:.2f} | "
              f"{c_ours:.1f} | {ops_ours:.1f} / {ops_theirs:.1f} | {reads_ours} / {reads_theirs} | "
              f"{host_ours:.2f} / {host_theirs:.2f} |", flush=True)
    (args.out / "results.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    write_csv(args.out / "results.csv", rows)


if __name__ == "__main__":
    main()
