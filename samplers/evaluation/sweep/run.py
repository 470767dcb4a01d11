"""Running a sweep: `Dist` (rank and world size from the launcher), `Runner` (one rank's share of the blocks, resume
and damaged-block checks, the manifest), and `versions` (what a result depends on)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ...runtime.loop import noise_from_seeds, per_sample_generators, sample
from .. import downloads, fid
from ..errors import SweepError
from ..metrics import Block, registered
from .aggregate import aggregate
from .artifacts import (
    Job,
    artifact_path,
    config_id,
    digest,
    expand,
    file_checksum,
    read_artifact,
    reference_id,
    work_list,
    write_atomic,
    write_text_atomic,
)
from .models import LoadedModel, build_accelerator, load_model, network
from .report import write_results
from .spec import DTYPES, Component, Grid, build_guider, build_solver


@dataclass
class Dist:
    """Rank and world size from the launcher's environment (torchrun / accelerate set RANK and WORLD_SIZE)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """From RANK, WORLD_SIZE and LOCAL_RANK (a single process when they are unset)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self) -> None:
        """Join the gloo process group when there are several ranks (24 h timeout: ranks wait on slow blocks)."""
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=timedelta(hours=24))

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group if `init` joined one."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Runner:
    """Executes one rank's share of a grid and (on rank 0) aggregates the artifacts."""

    def __init__(self, grid: Grid, out: str | Path, device: str | torch.device | None = None,
                 dist: Dist | None = None, log: Callable[[str], None] | None = None, offline: bool | None = None):
        self.grid, self.out = grid, Path(out)
        self.offline = downloads.is_offline(offline)
        self.dist = dist or Dist.from_env()
        try:
            self.device = fid.resolve_device(device, self.dist.local_rank)
        except fid.FIDError as err:
            raise SweepError(str(err)) from None
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._models: dict[Component, LoadedModel] = {}
        self.metrics = [cls(grid.metric) for cls in registered()]  # the registered metrics, for this grid
        self._budget = float("inf")  # blocks this process may still compute (--stop-after)

    # -- set-up
    def prepare_output(self) -> None:
        """Create the output folder (rank 0), check it is writable, remove temp files of killed runs."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write_probe.{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise SweepError(f"output folder {self.out} is not writable: {err.strerror or err}") from None
        for stale in [*self.out.glob("*/.*.tmp"), *self.out.glob("*/*/.*.tmp")]:
            stale.unlink(missing_ok=True)

    def model(self, spec: Component) -> LoadedModel:
        """The loaded model of ``spec`` (cached); SweepError if the grid guides a model without classes."""
        if spec not in self._models:
            loaded = load_model(spec, self.device, self.offline)
            for g in self.grid.guidance:
                if g.name != "none" and loaded.num_classes is None:
                    raise SweepError(f"guidance {g.label!r} needs a class-conditional model; model {spec.label} "
                                     "has no classes (e.g. gmm with num_classes: 4)")
            self._models[spec] = loaded
        return self._models[spec]

    def check_inputs(self) -> None:
        """Fail before any sampling: every model loads (downloads happen here) and every metric's inputs fit it
        (`Metric.check`, `Metric.missing_inputs`, `Metric.prepare`). Offline, one error names every missing file."""
        missing: list[downloads.Missing] = []
        for spec in self.grid.models:
            try:
                model = self.model(spec)
            except downloads.MissingFiles as err:
                missing += err.items
                continue
            for metric in self.metrics:
                metric.check(self, model)
        for metric in self.metrics:
            missing += metric.missing_inputs(self)
        downloads.require(missing)
        for metric in self.metrics:
            metric.prepare(self)

    def labels(self, model: LoadedModel, seeds: list[int]) -> torch.Tensor | None:
        """Class labels of a block, ``seed % num_classes`` per sample; None for an unconditional model."""
        if model.num_classes is None:
            return None
        return torch.tensor([s % model.num_classes for s in seeds], device=self.device)

    # -- one block
    def _solve(self, job: Job, solver: Component, accelerator: Component | None, nfe: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, int, float]:
        model = self.model(job.model)
        seeds = self.grid.block_seeds(job.block)
        scheduler = self._scheduler(job, solver, nfe)
        if accelerator is not None:
            scheduler = build_accelerator(accelerator, scheduler, model)
        labels = self.labels(model, seeds)
        cond = {} if labels is None else {"class_labels": labels}
        guider = build_guider(job.guidance)
        fn, callback = functools.partial(network(model), **cond), None
        if guider is not None:
            import guidance

            fn = guidance.guided_model(network(model), guider, cond, model.uncond_kwargs(len(seeds), self.device),
                                       scheduler=scheduler)
            callback = fn.step_end
        noise = noise_from_seeds(seeds, model.shape, self.device, dtype)
        generators = per_sample_generators(seeds, self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = sample(fn, scheduler, noise, nfe, generator=generators, callback=callback,
                            memory_format=model.memory_format)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result.samples, result.nfe, time.perf_counter() - start

    def _scheduler(self, job: Job, solver: Component, nfe: int) -> Any:
        """``build_solver``; a solver entry with ``tune: true`` (or a mapping of `samplers.tune` options:
        ``budget``, ``teacher_steps``, ``num_noises``) gets the grid `samplers.tune` finds for this model and NFE,
        tuned once and cached in ``tuned/<id>.json`` (calibration seeds far from the sweep's)."""
        options = dict(solver.options)
        if options.get("dc_ratios") == "search":
            return self._dc_search(job, solver, options, nfe)
        config = self.model(job.model).scheduler_config
        tune_opts = options.get("tune")
        if not tune_opts:
            return build_solver(solver, config)
        from ...solvers.tune import CALIBRATION_SEEDS, HOLDOUT_SEEDS, tune

        tune_opts = dict(tune_opts) if isinstance(tune_opts, tuple) else {}
        path = self.out / "tuned" / f"{digest({'model': job.model.spec, 'solver': solver.spec, 'nfe': nfe})}.json"
        if not path.is_file():
            model = self.model(job.model)
            self.log(f"tuning {solver.label} for {model.label} at NFE {nfe}")
            k = tune_opts.pop("num_noises", 64)
            noises = [noise_from_seeds(seeds[:k], model.shape, self.device) for seeds in (CALIBRATION_SEEDS,
                                                                                           HOLDOUT_SEEDS)]
            try:
                result = tune(network(model), build_solver(solver, config), nfe, calibration_noise=noises[0],
                              holdout_noise=noises[1], progress=False, **tune_opts)
            except ValueError as err:
                raise SweepError(f"solver {solver.label}: {err}") from None
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"timesteps": result.timesteps, "improved": result.improved,
                                                "message": result.message,
                                                "model_evaluations": result.model_evaluations}))
        tuned = {str(nfe): json.loads(path.read_text())["timesteps"]}
        return build_solver(solver, {**config, "tuned_timesteps": tuned})

    def _dc_search(self, job: Job, solver: Component, options: dict[str, Any], nfe: int) -> Any:
        """``dc_ratios: search``: DC-Solver ratios searched for this model and NFE on 10 noises (seeds far from the
        sweep's, a 200-step ground truth), cached in ``dc_ratios.json``."""
        from ...solvers.dc_solver import search_dc_ratios
        from ...solvers.tune import CALIBRATION_SEEDS

        model = self.model(job.model)
        scheduler = build_solver(solver, model.scheduler_config)
        noises = noise_from_seeds(CALIBRATION_SEEDS[:10], model.shape, self.device)
        options["dc_ratios"] = search_dc_ratios(network(model), scheduler, noises, nfe, reference_steps=200,
                                                cache=self.out / "dc_ratios.json", model_id=digest(job.model.spec))
        return build_solver(Component(solver.name, tuple(options.items()), solver.custom_label),
                            model.scheduler_config)

    def _features(self, job: Job, x: torch.Tensor, reference: np.ndarray | None) -> dict[str, np.ndarray]:
        """Every enabled metric's per-block arrays, and the samples' SHA-256 digest."""
        block = Block(self.model(job.model), reference)
        arrays = {}
        for metric in self.metrics:
            if metric.enabled():
                arrays.update(metric.features(self, block, x))
        arrays["digest"] = np.array(hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
        return arrays

    def run_job(self, job: Job) -> None:
        """Sample one block and write its artifact atomically: samples (reference) or squared errors to the
        reference and thumbnails (sampling), plus features, seeds, NFE, seconds, device and rank.
        FloatingPointError if the samples are not finite."""
        reference = None
        if job.kind == "reference":
            ref = self.grid.reference
            x, nfe, seconds = self._solve(job, ref["solver"], None, ref["nfe"], DTYPES[ref["dtype"]])
            arrays = {"samples": x.to(torch.float64).cpu().numpy()}
        else:
            cfg = job.config
            x, nfe, seconds = self._solve(job, cfg.solver, cfg.accelerator, cfg.nfe, DTYPES[self.grid.dtype])
            arrays = {}
            if self.grid.reference:
                reference = read_artifact(artifact_path(self.out, self.grid, Job("reference", job.model, job.guidance,
                                                                                 job.block)))["samples"]
            k = self.grid.metric["image_grid"]
            if job.block == 0 and k and self.model(job.model).is_image:
                arrays["thumbs"] = fid.samples_to_uint8(x[:k].clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{job.kind} block {job.block} of {self._job_label(job)} produced NaN/Inf")
        arrays.update(self._features(job, x, reference))
        arrays.update(seeds=np.array(self.grid.block_seeds(job.block)), nfe=np.array(nfe), seconds=np.array(seconds),
                      device=np.array(str(self.device)), rank=np.array(self.dist.rank))
        write_atomic(artifact_path(self.out, self.grid, job), arrays)

    @staticmethod
    def _job_label(job: Job) -> str:
        if job.config is None:
            return f"{job.model.label} / {job.guidance.label} reference"
        c = job.config
        return f"{c.model.label} / {c.solver.label} / {c.accelerator.label} / {c.guidance.label} / NFE {c.nfe}"

    # -- the sweep
    def run(self, stop_after: int | None = None) -> dict[str, Any] | None:
        """Run this rank's share; returns the aggregated results on rank 0 (None elsewhere or when stopped)."""
        self.dist.init()
        try:
            if self.dist.rank == 0:
                self.check_inputs()  # rank 0 downloads and caches first; the others then find it all there
            self.dist.barrier()
            if self.dist.rank != 0:
                self.check_inputs()
            refs, jobs = work_list(self.grid)
            if self.dist.rank == 0:
                self.prepare_output()
                self.drop_damaged_blocks(refs + jobs)
                self.write_manifest()
                done = sum(artifact_path(self.out, self.grid, j).is_file() for j in refs + jobs)
                if done:
                    self.log(f"resuming: {done} of {len(refs) + len(jobs)} blocks already done, skipping them")
            self.dist.barrier()
            self._budget = float("inf") if stop_after is None else stop_after
            self._run_phase(refs, "references")
            self.dist.barrier()
            if all(artifact_path(self.out, self.grid, j).is_file() for j in refs):
                self._run_phase(jobs, "sampling")
            self.dist.barrier()
            if self.dist.rank != 0:
                return None
            self.write_manifest()
            missing = sum(not artifact_path(self.out, self.grid, j).is_file() for j in refs + jobs)
            if missing:
                self.log(f"stopped with {missing} of {len(refs) + len(jobs)} blocks left (--stop-after); "
                         "rerun the same command to resume")
                return None
            return write_results(self.grid, self.out, aggregate(self.grid, self.out, self))
        finally:
            self.dist.close()

    def _run_phase(self, jobs: list[Job], name: str) -> None:
        """Run this rank's unfinished jobs of ``jobs`` until the ``--stop-after`` budget (if any) runs out."""
        mine = [j for k, j in enumerate(jobs) if k % self.dist.world == self.dist.rank]
        todo = [j for j in mine if not artifact_path(self.out, self.grid, j).is_file()]
        if len(todo) < len(mine):
            self.log(f"rank {self.dist.rank}: {name}: skipped {len(mine) - len(todo)} finished blocks")
        with tqdm(todo, desc=name, unit="block", disable=self.dist.rank != 0 or not todo, dynamic_ncols=True) as bar:
            for job in bar:
                if self._budget <= 0:
                    return
                bar.set_postfix_str(self._job_label(job), refresh=False)
                self.run_job(job)
                self._budget -= 1

    def drop_damaged_blocks(self, jobs: list[Job]) -> None:
        """Before resuming: delete every finished block whose file differs from the checksum in ``manifest.json``
        or, without a recorded checksum, does not load, with a warning naming it, so it is recomputed."""
        try:
            recorded = json.loads((self.out / "manifest.json").read_text()).get("checksums", {})
        except (OSError, ValueError, AttributeError):
            recorded = {}
        for job in jobs:
            path = artifact_path(self.out, self.grid, job)
            if not path.is_file():
                continue
            name = path.relative_to(self.out).as_posix()
            if name in recorded:
                problem = None if file_checksum(path) == recorded[name] else "its SHA-256 differs from the manifest's"
            else:
                try:
                    read_artifact(path)
                    problem = None
                except Exception as err:  # any damage: truncated zip, bad CRC, bad array header
                    problem = f"it does not load ({type(err).__name__}: {err})"
            if problem is not None:
                message = f"sweep block {name} ({self._job_label(job)}, block {job.block}) is damaged: {problem}; " \
                          "recomputing it"
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                self.log(message)
                path.unlink()

    def write_manifest(self) -> None:
        """Write ``manifest.json`` (configs, references, finished blocks per id with their SHA-256 checksums,
        world size, versions), ``config_used.yaml`` and ``versions.json`` into the output folder."""
        refs, jobs = work_list(self.grid)
        done: dict[str, list[int]] = {}
        checksums: dict[str, str] = {}
        for job in refs + jobs:
            path = artifact_path(self.out, self.grid, job)
            if path.is_file():
                done.setdefault(path.parent.name, []).append(job.block)
                checksums[path.relative_to(self.out).as_posix()] = file_checksum(path)
        configs = [{"id": config_id(self.grid, c), "model": c.model.label, "solver": c.solver.spec,
                    "accelerator": c.accelerator.spec, "guidance": c.guidance.spec, "nfe": c.nfe}
                   for c in expand(self.grid)]
        references = [{"id": reference_id(self.grid, m, g), "model": m.label, "guidance": g.spec}
                      for m in self.grid.models for g in self.grid.guidance] if self.grid.reference else []
        manifest = {"format": 1, "grid": self.grid.raw, "configs": configs, "references": references,
                    "num_blocks": {m.label: self.grid.blocks(m) for m in self.grid.models}, "done": done,
                    "checksums": checksums,
                    "world_size": self.dist.world, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions()}
        write_text_atomic(self.out / "manifest.json", json.dumps(manifest, indent=1))
        write_text_atomic(self.out / "config_used.yaml", yaml.safe_dump(self.grid.raw, sort_keys=False))
        write_text_atomic(self.out / "versions.json", json.dumps(versions(), indent=1))


def versions() -> dict[str, str]:
    """Versions of python and the packages a result depends on (torch with its build tag), and the GPU."""
    import diffusers
    import scipy

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        out["samplers"] = importlib.metadata.version("diffusion-samplers")
    except importlib.metadata.PackageNotFoundError:
        out["samplers"] = "not installed (run from a source tree)"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out

