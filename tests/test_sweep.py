"""Sweep harness: grid validation, exact data moments, metrics against a direct computation, resume, outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_factory import tiny_unet

import samplers
from samplers.evaluation import downloads, fid, sweep
from samplers.testbeds import GaussianMixtureModel, GaussianModel

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sweep.py"  # the CLI, loaded as a module: main() returns the exit code

TINY = {
    "models": [{"name": "gmm", "label": "gmm8", "shape": [3, 8, 8], "num_components": 4, "std": 0.2}],
    "solvers": [{"name": "dpmsolver++", "solver_order": 2}, {"name": "dpmsolver++", "solver_order": 3}],
    "nfe": [3, 6],
    "seeds": {"start": 0, "num_blocks": 3, "block_size": 4},
    "reference": {"solver": {"name": "dpmsolver++", "solver_order": 3}, "nfe": 30},
    "metric": {"pixel_resolution": 4, "image_grid": 2},
}
METRIC_KEYS = ("pixel_fd", "rmse", "rmse_median", "samples", "nfe_actual", "config_id")


def tiny(**changes) -> dict:
    grid = copy.deepcopy(TINY)
    grid.update(changes)
    return grid


def run(grid: dict, out: Path, **kwargs) -> tuple[dict | None, list[str]]:
    lines: list[str] = []
    return sweep.run_sweep(grid, out, log=lines.append, **kwargs), lines


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    results, _ = run(tiny(), out)
    return out, results


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, message", [
    ({"solvers": ["nope"]}, "solvers[0]: unknown solver 'nope'; known solvers: ['"),
    ({"solvers": ["diffusers:NotAScheduler"]}, "'diffusers:NotAScheduler' is not a diffusers scheduler class"),
    ({"solvers": [{"solver_order": 2}]}, "solvers[0] needs a 'name' key"),
    ({"solvers": [{"name": "dpmsolver++", "solver_ordr": 2}]}, "dpmsolver++ has no option 'solver_ordr'"),
    ({"solvers": [{"name": "dpmsolver++", "solver_order": 7}]}, "solver_order must be one of"),
    ({"solvers": ["dpmsolver++", {"name": "dpmsolver++"}]}, "lists 'dpmsolver++' twice"),
    ({"solver": ["dpmsolver++"]}, "unknown key 'solver' in grid spec"),
    ({"seeds": {"blocks": 2}}, "unknown key 'blocks' in seeds"),
    ({"solvers": ["dc-solver"]}, "dc-solver needs dc_ratios (a list, or 'search' to search them per model and NFE)"),
    ({"solvers": [{"name": "unipc", "tune": {"budgit": 100}}]}, "tune has no option 'budgit'"),
    ({"nfe": [5, 0]}, "nfe[1] (number of function evaluations) must be an integer >= 1, got 0"),
    ({"nfe": [-3]}, "nfe[0] (number of function evaluations) must be an integer >= 1, got -3"),
    ({"nfe": ["ten"]}, "must be an integer >= 1, got 'ten'"),
    ({"nfe": []}, "nfe must be a non-empty list"),
    ({"seeds": {"num_blocks": 1, "block_size": 1}}, "a Frechet distance needs at least 2 samples"),
    ({"seeds": {"block_size": 0}}, "seeds.block_size must be an integer >= 1"),
    ({"accelerators": ["warp"]}, "accelerators[0]: unknown accelerator 'warp'; expected one of ['none', "),
    ({"accelerators": [{"name": "timeshift", "widow": 3}]}, "timeshift has no option 'widow'"),
    ({"guidance": [{"name": "cfg"}]}, "guidance[0] (cfg)"),
    ({"models": [{"name": "imagenet"}]}, "models[0]: unknown model 'imagenet'"),
    ({"models": [{"name": "gmm", "num_blocks": 0}]}, "models[0].num_blocks must be an integer >= 1, got 0"),
    ({"metric": {"pixel_resolution": 0}}, "metric.pixel_resolution must be an integer >= 1"),
    ({"metric": {"inception_dims": 100}}, "metric.inception_dims must be one of"),
    ({"sampling": {"dtype": "float16"}}, "sampling.dtype must be one of"),
])
def test_bad_grid_spec_names_the_key(change, message):
    with pytest.raises(sweep.SweepError) as err:
        sweep.parse_grid(tiny(**change))
    assert message in str(err.value)


def test_work_list_shards_per_model_blocks():
    grid = sweep.parse_grid(tiny(models=[TINY["models"][0], {"name": "gmm", "label": "slow", "num_blocks": 1}]))
    refs, jobs = sweep.work_list(grid)
    assert [(j.model.label, j.block) for j in refs] == [("gmm8", 0), ("gmm8", 1), ("gmm8", 2), ("slow", 0)]
    assert len(jobs) == 2 * 2 * (3 + 1)  # solvers x NFE x (blocks of gmm8 + blocks of slow)
    assert len({sweep.artifact_path(Path("o"), grid, j) for j in refs + jobs}) == len(refs) + len(jobs)


def test_missing_accelerator_or_guidance_class_is_a_clear_error():
    with pytest.raises(sweep.SweepError, match=r"accelerators\[0\]: unknown accelerator 'warp'; expected one of "
                                               r"\['none', .*'teleport'"):
        sweep._accelerator_class(sweep.Component("warp"), "accelerators[0]")
    with pytest.raises(sweep.SweepError, match=r"guidance\[0\]: unknown guidance 'warp'; expected one of "
                                               r"\['none', 'cfg', 'apg'\]"):
        sweep._guidance_class(sweep.Component("warp"), "guidance[0]")


def test_every_extension_module_is_imported_so_new_ones_register():
    import pkgutil
    import sys

    import guidance

    for package in (samplers.solvers, samplers.accelerators, guidance):
        names = [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
        assert names and all(name in sys.modules for name in names), package.__name__


def test_extensions_register_themselves_and_the_sweep_builds_them():
    """A new accelerator or guider is its class with a ``registry_name``: nothing in the sweep changes."""
    import guidance
    from guidance.base import GUIDERS
    from samplers.accelerators.base import ACCELERATORS, WRAPPER_CLASSES, SchedulerWrapper

    class Warp(SchedulerWrapper):
        """Test accelerator."""

        registry_name = "warp-test"

        def __init__(self, scheduler, factor: float = 1.0):
            super().__init__(scheduler)
            self.factor = factor

    class Halve(guidance.CFG):
        """Test guider."""

        registry_name = "halve-test"

    class Toy(samplers.DPMSolverPlusPlusScheduler):
        """Test solver."""

        registry_name = "toy-test"

    try:
        assert sweep.solver_class("toy-test") is Toy and samplers.SCHEDULERS["toy-test"] is Toy
        dc = samplers.with_dynamic_compensation(Toy)  # subclasses do not inherit the registry name
        assert dc not in samplers.SCHEDULERS.values() and set(samplers.SCHEDULERS) == {
            "dpmsolver++", "deis", "unipc", "dc-solver", "toy-test"}
        assert sweep._accelerator_class(sweep.Component("warp-test")) is Warp
        built = sweep.build_accelerator(sweep.Component("warp-test", (("factor", 2.0),)),
                                        samplers.UniPCScheduler(), model=None)
        assert type(built) is Warp and built.factor == 2.0 and type(built.inner) is samplers.UniPCScheduler
        guider = sweep.build_guider(sweep.Component("halve-test", (("scale", 1.5),)))
        assert type(guider) is Halve and guider.scale == 1.5
    finally:
        ACCELERATORS.pop("warp-test"), WRAPPER_CLASSES.pop("Warp"), GUIDERS.pop("halve-test")
        samplers.SCHEDULERS.pop("toy-test")


def test_guidance_needs_a_conditional_model(tmp_path):
    with pytest.raises(sweep.SweepError, match="guidance 'cfg\\(scale=2.0\\)' needs a class-conditional model"):
        run(tiny(guidance=[{"name": "cfg", "scale": 2.0}]), tmp_path)


def test_stats_with_wrong_dims(tmp_path):
    stats = tmp_path / "pixels.npz"
    np.savez(stats, mu=np.zeros(5), sigma=np.eye(5))
    with pytest.raises(sweep.SweepError, match=r"holds 5-dim stats, but the sweep's features have 48 dims"):
        run(tiny(metric={"pixel_resolution": 4, "pixel_stats": str(stats)}), tmp_path / "out")
    assert not (tmp_path / "out").exists(), "the check must run before anything is written"
    with pytest.raises(fid.FIDError, match="expected 'mu' and 'sigma'"):
        np.savez(stats, mean=np.zeros(48))
        run(tiny(metric={"pixel_resolution": 4, "pixel_stats": str(stats)}), tmp_path / "out")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(sweep.SweepError, match=r"output folder .*a_file/out is not writable"):
        run(tiny(), blocker / "out")


def test_diffusers_model_not_cached_fails_offline(tmp_path):
    with pytest.raises(sweep.SweepError, match="unknown option 'pth'; expected one of"):
        sweep.load_model(sweep.parse_component({"name": "diffusers", "pth": "x"}, "m"), torch.device("cpu"))
    spec = {"name": "diffusers", "path": "no-such-user/no-such-model"}
    with pytest.raises(sweep.SweepError, match="cannot load a UNet2DModel from 'no-such-user/no-such-model' offline"):
        sweep.load_model(sweep.parse_component({**spec, "local_files_only": True}, "m"), torch.device("cpu"))
    with pytest.raises(downloads.MissingFiles, match="huggingface-cli download no-such-user/no-such-model"):
        sweep.load_model(sweep.parse_component(spec, "m"), torch.device("cpu"), offline=True)


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("sweep_cli", SCRIPT)
    cli = module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = tmp_path / "bad.yaml"
    cases = [(["--nfe", "0"], "nfe[0]"), (["--stop-after", "0"], "--stop-after must be >= 1"),
             (["--device", "gpu7"], "invalid device 'gpu7'; use cpu, cuda or cuda:N"),
             (["--threads", "0"], "--threads must be >= 1, got 0"),
             (["--config", str(tmp_path / "missing.yaml")], "grid spec not found"),
             (["--config", str(bad)], "is not valid YAML")]
    bad.write_text("solvers: [unclosed\n")
    for args, message in cases:
        assert cli.main(["--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------------ metrics


def test_mixture_moments_match_the_definition():
    m = GaussianMixtureModel(shape=(3, 4, 4), num_components=5, std=(0.1, 0.2, 0.3, 0.1, 0.2), seed=3,
                             weights=torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0]))
    mean, cov = sweep.data_moments(m)
    w = m.log_w.exp()
    centred = m.means - mean
    expected = (centred.T * w) @ centred + torch.eye(48, dtype=torch.float64) * float(w @ m.vars)
    torch.testing.assert_close(mean, w @ m.means, rtol=0, atol=1e-14)
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-13)
    data = m.sample_data(100_000, torch.Generator().manual_seed(0)).reshape(100_000, -1)
    assert float((data.mean(0) - mean).abs().max()) < 0.01
    assert float((torch.cov(data.T) - cov).abs().max()) < 0.01


def test_conditional_mixture_weights_follow_the_labels():
    m = GaussianMixtureModel(shape=(1, 2, 2), num_components=4, num_classes=2)
    w = sweep.label_weights(m, torch.tensor([0, 0, 0, 1]))  # components 0, 2 are class 0; 1, 3 class 1
    torch.testing.assert_close(w, torch.tensor([0.375, 0.125, 0.375, 0.125], dtype=torch.float64))


def test_gaussian_moments_and_pooled_moments():
    g = GaussianModel(shape=(3, 8, 8), rank=4, seed=1)
    mean, cov = sweep.data_moments(g)
    data = g.sample_data(20_000, torch.Generator().manual_seed(0)).reshape(20_000, -1)
    assert float((torch.cov(data.T) - cov).abs().max()) < 0.02
    # pooling is linear: moments of pooled features = (P mean, P cov P^T) with P built column by column
    P = sweep.pixel_features(torch.eye(192, dtype=torch.float64).reshape(192, 3, 8, 8), 4).T  # (48, 192)
    pm, pc = sweep.feature_moments(mean, cov, (3, 8, 8), 4)
    np.testing.assert_allclose(pm, (P @ mean).numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(pc, (P @ cov @ P.T).numpy(), rtol=0, atol=1e-14)


def test_results_match_a_direct_computation(baseline):
    """Block-merged metrics equal the metrics of the same samples computed in one go (same batches)."""
    out, results = baseline
    row = next(r for r in results["rows"] if r["solver"] == "dpmsolver++(solver_order=3)" and r["nfe"] == 6)
    model = GaussianMixtureModel.for_scheduler_config({}, shape=(3, 8, 8), num_components=4, std=0.2)
    xs, refs = [], []
    for block in range(3):
        noise = samplers.noise_from_seeds(range(4 * block, 4 * block + 4), (3, 8, 8))
        xs.append(samplers.sample(model, samplers.DPMSolverPlusPlusScheduler(solver_order=3), noise, 6).samples)
        noise64 = samplers.noise_from_seeds(range(4 * block, 4 * block + 4), (3, 8, 8), dtype=torch.float64)
        refs.append(samplers.sample(model, samplers.DPMSolverPlusPlusScheduler(solver_order=3), noise64, 30).samples)
    x, ref = torch.cat(xs).double(), torch.cat(refs)
    per_sample = (x - ref).reshape(12, -1).square().mean(1).sqrt()
    assert row["rmse"] == pytest.approx(float(per_sample.square().mean().sqrt()), rel=1e-12)
    assert row["rmse_median"] == pytest.approx(float(np.median(per_sample.numpy())), rel=1e-12)
    feats = torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(12, -1).numpy()
    mean, cov = sweep.feature_moments(*sweep.data_moments(model), (3, 8, 8), 4)
    expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mean, cov)
    # 12 samples of 48 features: a rank-deficient covariance, whose sqrtm turns 1e-16 rounding into ~1e-8
    assert row["pixel_fd"] == pytest.approx(expected, rel=1e-6)
    assert row["samples"] == 12 and row["nfe_actual"] == 6


FLOW_GMM = {"name": "gmm", "label": "flow8", "shape": [3, 8, 8], "num_components": 4, "std": 0.2,
            "noise_schedule": "flow", "shift": 3.0}


def test_solver_rows_run_only_on_the_model_family_they_serve():
    grid = sweep.parse_grid(tiny(models=[TINY["models"][0], FLOW_GMM], solvers=[
        "unipc", "diffusers:DPMSolverMultistepScheduler", "diffusers:FlowMatchEulerDiscreteScheduler",
        {"name": "diffusers:UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction"}]))
    rows = {(c.model.label, c.solver.label) for c in sweep.expand(grid)}
    flow_unipc = "diffusers:UniPCMultistepScheduler(prediction_type=flow_prediction, use_flow_sigmas=True)"
    assert rows == {("gmm8", "unipc"), ("gmm8", "diffusers:DPMSolverMultistepScheduler"), ("flow8", "unipc"),
                    ("flow8", "diffusers:FlowMatchEulerDiscreteScheduler"), ("flow8", flow_unipc)}


@pytest.mark.parametrize("model, message", [
    ({**FLOW_GMM, "noise_schedule": "ve"}, "noise_schedule must be 'vp' or 'flow'"),
    ({**TINY["models"][0], "shift": 3.0}, "shift needs noise_schedule: flow"),
    ({**FLOW_GMM, "shift": 0}, "shift must be a positive number, got 0"),
    ({**FLOW_GMM, "beta_start": 0.001}, "'beta_start' is a VP option"),
])
def test_bad_flow_model_options_are_named(model, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load_model(sweep.parse_component(model, "models[0]"), torch.device("cpu"))


def test_flow_rows_match_a_direct_computation(tmp_path):
    """A flow testbed's rows: SD3's stock scheduler and ours from its config, against the project's flow reference."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = tiny(models=[FLOW_GMM], solvers=["diffusers:FlowMatchEulerDiscreteScheduler", "unipc"], nfe=[4])
    results, _ = run(grid, tmp_path)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    model = GaussianMixtureModel(shape=(3, 8, 8), num_components=4, std=0.2,
                                 schedule=samplers.solvers.schedule.FlowMatchingSchedule(1000),
                                 prediction_type="flow_prediction")
    noise = samplers.noise_from_seeds(range(12), (3, 8, 8), dtype=torch.float64)
    ref = samplers.sample(model, samplers.DPMSolverPlusPlusScheduler.from_config(config, solver_order=3), noise,
                          30).samples
    for name, cls in (("diffusers:FlowMatchEulerDiscreteScheduler", FlowMatchEulerDiscreteScheduler),
                      ("unipc", samplers.UniPCScheduler)):
        row = next(r for r in results["rows"] if r["solver"] == name)
        x = torch.cat([samplers.sample(model, cls.from_config(config), noise[i:i + 4].float(), 4).samples
                       for i in (0, 4, 8)]).double()
        per_sample = (x - ref).reshape(12, -1).square().mean(1).sqrt()
        assert row["rmse"] == pytest.approx(float(per_sample.square().mean().sqrt()), rel=1e-9)
        assert row["rmse_median"] == pytest.approx(float(np.median(per_sample.numpy())), rel=1e-9)


def test_sample_depends_only_on_its_seed(baseline, tmp_path):
    """Same seeds in blocks of 4 and of 6: the same samples (up to float32 batch rounding)."""
    out, _ = baseline
    other, _ = run(tiny(seeds={"start": 0, "num_blocks": 2, "block_size": 6}, nfe=[3]), tmp_path)

    def features(folder: Path, solver: str) -> np.ndarray:
        row = next(r for r in json.loads((folder / "results.json").read_text())["rows"]
                   if r["solver"] == solver and r["nfe"] == 3)
        files = sorted((folder / "blocks" / row["config_id"]).glob("block_*.npz"))
        return np.concatenate([np.load(f)["pixel_features"] for f in files])

    for solver in ("dpmsolver++(solver_order=2)", "dpmsolver++(solver_order=3)"):
        np.testing.assert_allclose(features(tmp_path, solver), features(out, solver), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ resume, outputs


def test_stopped_sweep_resumes_to_the_same_table(baseline, tmp_path):
    out, results = baseline
    stopped, lines = run(tiny(), tmp_path, stop_after=4)
    assert stopped is None and any("rerun the same command to resume" in line for line in lines)
    done = sorted(tmp_path.glob("*/*/block_*.npz"))
    assert len(done) == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sum(len(v) for v in manifest["done"].values()) == 4
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    resumed, lines = run(tiny(), tmp_path)
    assert "resuming: 4 of 15 blocks already done, skipping them" in lines
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes, "finished blocks were recomputed"
    for a, b in zip(resumed["rows"], results["rows"]):
        assert {k: a[k] for k in METRIC_KEYS} == {k: b[k] for k in METRIC_KEYS}
    rerun, lines = run(tiny(), tmp_path)
    assert "resuming: 15 of 15 blocks already done, skipping them" in lines
    assert rerun["rows"] == resumed["rows"]


def test_damaged_blocks_are_recomputed_with_a_warning(baseline, tmp_path):
    """A block damaged outside the sweep (truncated, or altered but loadable) is recomputed on resume, with a
    warning naming it; a block the manifest has no checksum for is recomputed when it does not load."""
    out, results = baseline
    run(tiny(), tmp_path, stop_after=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    done = sorted(tmp_path.glob("*/*/block_*.npz"))
    assert sorted(manifest["checksums"]) == sorted(p.relative_to(tmp_path).as_posix() for p in done)
    truncated, altered, unrecorded = done[0], done[1], done[2]
    truncated.write_bytes(truncated.read_bytes()[:200])
    arrays = dict(np.load(altered))
    arrays["seconds"] = arrays["seconds"] + 1.0
    np.savez(altered, **arrays)
    del manifest["checksums"][unrecorded.relative_to(tmp_path).as_posix()]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    unrecorded.write_bytes(unrecorded.read_bytes()[:-50])
    with pytest.warns(RuntimeWarning) as caught:
        resumed, lines = run(tiny(), tmp_path)
    messages = [str(w.message) for w in caught if "is damaged" in str(w.message)]
    assert len(messages) == 3
    for damaged in (truncated, altered):
        assert any(f"sweep block {damaged.relative_to(tmp_path).as_posix()} " in m and "SHA-256 differs" in m
                   for m in messages)
    assert any(unrecorded.relative_to(tmp_path).as_posix() in m and "does not load (BadZipFile" in m
               for m in messages)
    assert "resuming: 1 of 15 blocks already done, skipping them" in lines
    for a, b in zip(resumed["rows"], results["rows"]):
        assert {k: a[k] for k in METRIC_KEYS} == {k: b[k] for k in METRIC_KEYS}


def test_outputs(baseline):
    out, results = baseline
    rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert [(r["solver"], int(r["nfe"])) for r in rows] == [
        ("dpmsolver++(solver_order=2)", 3), ("dpmsolver++(solver_order=2)", 6),
        ("dpmsolver++(solver_order=3)", 3), ("dpmsolver++(solver_order=3)", 6)]
    assert float(rows[3]["rmse"]) < float(rows[2]["rmse"]), "more NFE must reduce the error to the reference"
    md = (out / "results.md").read_text()
    assert "| solver | accelerator | guidance | NFE 3 | NFE 6 |" in md
    assert f"| dpmsolver++(solver_order=3) | none | none | {results['rows'][2]['rmse']:.4g} |" in md
    assert "### Sampling throughput" in md
    used = yaml.safe_load((out / "config_used.yaml").read_text())
    assert sweep.parse_grid(used).raw == used and used["nfe"] == [3, 6]
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__
    assert {"python", "torch", "diffusers", "numpy", "samplers"} <= versions.keys()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["configs"]) == 4 and all(v == [0, 1, 2] for v in manifest["done"].values())
    assert [(t["model"], t["nfe"], t["images"]) for t in results["throughput"]] == [("gmm8", 3, 24), ("gmm8", 6, 24)]
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("plots/samples/") for name in results["plots"])
    assert not list(out.rglob("*.tmp")), "temp files must be renamed into place"


def test_results_go_to_stdout_and_plots_leave_the_backend_alone(baseline, capsys):
    """The table is the program's output (stdout); the plots draw on their own Agg canvases, so a notebook's
    backend (here: a sentinel) survives."""
    import matplotlib

    out, results = baseline
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        sweep.write_results(sweep.parse_grid(tiny()), out, copy.deepcopy(results))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    captured = capsys.readouterr()
    assert (out / "results.md").read_text().strip() in captured.out and "images/s" in captured.out
    assert captured.err == ""


def test_labelled_image_grid():
    rows = [np.full((3, 2, 2, 3), v, np.uint8) for v in (10, 200)]
    fig = sweep.labelled_image_grid(rows, ["NFE 5", "NFE 10"], ["seed 0", "seed 1", "seed 2"], "gmm / unipc")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["NFE 5", "NFE 10"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["seed 0", "seed 1", "seed 2"]
    assert ax.get_xlabel() == "gmm / unipc"
    assert np.array_equal(ax.images[0].get_array(), sweep.image_grid(rows))


def test_image_grid_layout():
    rows = [np.full((3, 2, 2, 3), v, np.uint8) for v in (10, 200)]
    grid = sweep.image_grid(rows, scale=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[6, 1, 0] == 200 and grid[0, 0, 0] == 255


# ------------------------------------------------------------------------------------------------ other models


def test_diffusers_unet_from_a_local_folder(tmp_path):
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").save_pretrained(
        tmp_path / "pipe" / "scheduler")
    grid = tiny(models=[{"name": "diffusers", "label": "tiny-unet", "path": str(tmp_path / "pipe")}],
                solvers=["dpmsolver++"], nfe=[2], reference=None, seeds={"num_blocks": 2, "block_size": 2})
    results, _ = run(grid, tmp_path / "out")
    (row,) = results["rows"]
    assert row["samples"] == 4 and row["nfe_actual"] == 2
    assert row["pixel_fd"] is None and row["rmse"] is None, "no data distribution and no reference: no metric"
    loaded = sweep.load_model(sweep.parse_component(grid["models"][0], "m"), torch.device("cpu"))
    assert loaded.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    noise = samplers.noise_from_seeds([0, 1], (3, 8, 8))
    scheduler = samplers.DPMSolverPlusPlusScheduler.from_config(loaded.scheduler_config)
    with torch.inference_mode():
        x = samplers.sample(unet, scheduler, noise, 2).samples
    block = np.load(next((tmp_path / "out" / "blocks").glob("*/block_00000.npz")))
    np.testing.assert_array_equal(block["pixel_features"], sweep.pixel_features(x, 4).numpy())


def test_speed_options_compile_and_channels_last_keep_the_samples(tmp_path):
    from diffusers import DDPMScheduler

    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "pipe" / "scheduler")
    spec = {"name": "diffusers", "label": "tiny-unet", "path": str(tmp_path / "pipe")}
    fast = {**spec, "compile": {"backend": "eager"}, "channels_last": True}
    blocks = []
    for name, model in (("plain", spec), ("fast", fast)):
        grid = tiny(models=[model], solvers=["unipc"], nfe=[3], reference=None,
                    seeds={"num_blocks": 1, "block_size": 3})
        run(grid, tmp_path / name)
        blocks.append(np.load(next((tmp_path / name / "blocks").glob("*/block_00000.npz")))["pixel_features"])
    np.testing.assert_allclose(blocks[1], blocks[0], rtol=1e-5, atol=1e-4)  # float32 conv order only
    loaded = sweep.load_model(sweep.parse_component(fast, "m"), torch.device("cpu"))
    assert isinstance(loaded.net, torch._dynamo.eval_frame.OptimizedModule)
    assert loaded.memory_format is torch.channels_last
    for option, message in ((("compile", "fast"), "compile must be true, false or a mapping"),
                            (("channels_last", "yes"), "channels_last must be true or false")):
        with pytest.raises(sweep.SweepError, match=message):
            sweep.load_model(sweep.parse_component({**spec, option[0]: option[1]}, "m"), torch.device("cpu"))


def test_inception_fid_column(tmp_path):
    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)
    torch.save(fid.build_fid_inception_without_weights().state_dict(), weights)
    grid = tiny(solvers=["dpmsolver++"], nfe=[2], seeds={"num_blocks": 2, "block_size": 3},
                metric={"pixel_resolution": 4, "inception_weights": str(weights), "inception_dims": 64,
                        "data_samples": 16})
    results, _ = run(grid, tmp_path / "out")
    (row,) = results["rows"]
    blocks = sorted((tmp_path / "out" / "blocks" / row["config_id"]).glob("block_*.npz"))
    feats = np.concatenate([np.load(b)["inception_features"] for b in blocks])
    assert feats.shape == (6, 64)
    (ref_stats,) = (tmp_path / "out" / "reference").glob("inception_*.npz")
    mu, sigma = fid.load_stats(ref_stats)  # a pytorch-fid stats file of 16 exact data samples
    expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert row["inception_fid"] == pytest.approx(expected, rel=1e-6)
    # the stored features are the Inception features of the block's samples
    model = GaussianMixtureModel.for_scheduler_config({}, shape=(3, 8, 8), num_components=4, std=0.2)
    x = samplers.sample(model, samplers.DPMSolverPlusPlusScheduler(), samplers.noise_from_seeds([0, 1, 2], (3, 8, 8)),
                        2).samples
    net = fid.load_fid_inception(weights, dims=64, device="cpu")
    np.testing.assert_allclose(feats[:3], net.features(fid.samples_to_uint8(x)).numpy(), rtol=0, atol=1e-6)


def test_tuned_and_dc_search_rows_are_computed_once_and_cached(tmp_path):
    """``tune:`` and ``dc_ratios: search`` solver entries: the grid and the ratios are found once per model and NFE,
    cached in the output folder (a rerun in a new folder reuses nothing, the same folder recomputes nothing), and
    the tuned row uses exactly the cached grid; results.md opens with the best configuration per NFE."""
    tuned = {"name": "unipc", "label": "unipc tuned", "tune": {"budget": 120, "teacher_steps": 20, "num_noises": 8}}
    grid = tiny(solvers=[tuned, {"name": "dc-solver", "dc_ratios": "search"}, "unipc"], nfe=[4])
    results, _ = run(grid, tmp_path)
    (cached,) = (tmp_path / "tuned").glob("*.json")
    timesteps = json.loads(cached.read_text())["timesteps"]
    assert len(timesteps) == 4 and (tmp_path / "dc_ratios.json").is_file()
    rows = {r["solver"]: r for r in results["rows"]}
    assert rows["unipc tuned"]["rmse_p90"] >= rows["unipc tuned"]["rmse_median"] > 0
    assert (tmp_path / "results.md").read_text().startswith("### Best per NFE (lowest pixel FD)")
    stamps = (cached.stat().st_mtime_ns, (tmp_path / "dc_ratios.json").stat().st_mtime_ns)
    for block in (tmp_path / "blocks").rglob("*.npz"):
        block.unlink()
    again, _ = run(grid, tmp_path)
    assert (cached.stat().st_mtime_ns, (tmp_path / "dc_ratios.json").stat().st_mtime_ns) == stamps
    assert [r["pixel_fd"] for r in again["rows"]] == [r["pixel_fd"] for r in results["rows"]]
