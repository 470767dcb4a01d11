"""Sweep metrics: the registry (a metric defined here, in the test, gets its column in a tiny sweep), the built-in
metrics' names and columns, and result files written with the benches' old names still load."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from samplers.evaluation import metrics, sweep

TINY = {
    "models": [{"name": "gmm", "label": "gmm8", "shape": [3, 8, 8], "num_components": 4, "std": 0.2}],
    "solvers": [{"name": "dpmsolver++", "solver_order": 2}],
    "nfe": [3, 6],
    "seeds": {"start": 0, "num_blocks": 2, "block_size": 4},
    "reference": {"solver": {"name": "dpmsolver++", "solver_order": 3}, "nfe": 30},
    "metric": {"pixel_resolution": 4, "image_grid": 0},
}


def test_builtin_metrics_are_registered_with_the_sweep_columns():
    assert [cls.name for cls in metrics.registered()] == ["pixel_fd", "rmse", "inception_fid"]
    assert [c for c, _ in metrics.metric_columns()] == ["pixel_fd", "rmse", "rmse_median", "rmse_p90",
                                                        "inception_fid"]
    assert sweep.csv_columns() == ("model", "solver", "accelerator", "guidance", "nfe", "nfe_actual", "samples",
                                   "pixel_fd", "rmse", "rmse_median", "rmse_p90", "inception_fid", "seconds",
                                   "images_per_s", "config_id")


def test_a_metric_defined_in_a_test_gets_its_column(tmp_path):
    """One subclass is the whole extension: its option, stored features, target and reduction reach the CSV,
    JSON and markdown of a sweep; unregistering removes it again."""

    class MaxAbs(metrics.Metric):
        """Largest |x| over all samples, divided by ``max_abs_scale``."""

        name = "max_abs"
        columns = {"max_abs": "largest absolute sample value"}
        defaults = {"max_abs_scale": 1.0}

        @classmethod
        def validate(cls, settings):
            if settings["max_abs_scale"] <= 0:
                raise sweep.SweepError("metric.max_abs_scale must be > 0")

        def features(self, ctx, block, x):
            return {"max_abs": x.abs().reshape(len(x), -1).amax(1).double().cpu().numpy()}

        def target(self, ctx, model, labels, num_samples):
            return self.settings["max_abs_scale"]

        def reduce(self, blocks, target, model):
            return {"max_abs": float(np.concatenate([a["max_abs"] for a in blocks]).max()) / target}

    try:
        assert metrics.METRICS["max_abs"] is MaxAbs
        with pytest.raises(sweep.SweepError, match="max_abs_scale must be > 0"):
            sweep.parse_grid({**TINY, "metric": {"max_abs_scale": 0}})
        results = sweep.run_sweep({**TINY, "metric": {**TINY["metric"], "max_abs_scale": 2.0}}, tmp_path,
                                  log=lambda _: None)
        rows = list(csv.DictReader((tmp_path / "results.csv").open()))
        assert list(rows[0])[11:13] == ["inception_fid", "max_abs"]
        for row, result in zip(rows, results["rows"]):
            block_max = max(np.load(f)["max_abs"].max() for f in (tmp_path / "blocks" / row["config_id"]).glob("*.npz"))
            assert float(row["max_abs"]) == pytest.approx(block_max / 2.0) == result["max_abs"]
            assert row["pixel_fd"] and row["rmse"]  # the built-in metrics still run
        assert "### gmm8: largest absolute sample value" in (tmp_path / "results.md").read_text()
        assert json.loads((tmp_path / "results.json").read_text())["grid"]["metric"]["max_abs_scale"] == 2.0
    finally:
        metrics.unregister("max_abs")
    assert "max_abs" not in metrics.METRICS and "max_abs" not in sweep.csv_columns()
    assert "max_abs_scale" not in sweep.parse_grid(TINY).metric


def test_registering_a_taken_name_or_column_fails():
    with pytest.raises(ValueError, match="already registered"):
        type("Again", (metrics.Metric,), {"name": "rmse", "columns": {"x": "x"}})
    with pytest.raises(ValueError, match="column 'rmse_p90' is already filled"):
        type("Clash", (metrics.Metric,), {"name": "clash", "columns": {"rmse_p90": "x"}})
    assert "clash" not in metrics.METRICS


def test_a_new_metric_changes_the_artifact_ids():
    """Blocks stored without a metric's features are never reused once it is registered."""
    grid = sweep.parse_grid(TINY)
    before = sweep.config_id(grid, sweep.expand(grid)[0])
    type("Extra", (metrics.Metric,), {"name": "extra", "columns": {"extra": "x"}})
    try:
        assert sweep.config_id(grid, sweep.expand(grid)[0]) != before
    finally:
        metrics.unregister("extra")
    assert sweep.config_id(grid, sweep.expand(grid)[0]) == before


def test_result_files_with_old_names_still_load(tmp_path):
    old_csv = tmp_path / "old.csv"
    old_csv.write_text("testbed,nfe,rms,median,p90,frechet\ngmm,5,0.1,0.05,0.2,3.5\nlearned,10,0.01,,0.02,1.25\n")
    rows = sweep.read_results(old_csv)
    assert rows[0] == {"testbed": "gmm", "nfe": 5, "rmse": 0.1, "rmse_median": 0.05, "rmse_p90": 0.2,
                       "pixel_fd": 3.5}
    assert rows[1]["rmse_median"] is None and rows[1]["pixel_fd"] == 1.25
    old_json = tmp_path / "old.json"
    old_json.write_text(json.dumps({"rows": [{"solver": "unipc", "fd": 2.0, "rms": 0.3}]}))
    assert sweep.read_results(old_json) == [{"solver": "unipc", "pixel_fd": 2.0, "rmse": 0.3}]
    new_csv = tmp_path / "new.csv"
    sweep.write_csv(new_csv, rows)
    assert sweep.read_results(new_csv) == rows
    assert metrics.canonical_name("frechet") == "pixel_fd" and metrics.canonical_name("rmse") == "rmse"


def test_write_csv_takes_every_key_or_the_given_columns(tmp_path):
    path = tmp_path / "t.csv"
    sweep.write_csv(path, [{"a": 1, "b": 2.5}, {"a": 3, "c": "x"}])
    assert path.read_text().splitlines() == ["a,b,c", "1,2.5,", "3,,x"]
    sweep.write_csv(path, [{"a": 1, "b_ratios": [1]}], columns=["a"])
    assert path.read_text().splitlines() == ["a", "1"]
    sweep.write_csv(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()


def test_pixel_fd_metric_matches_the_frechet_distance():
    """The registered pixel_fd reduction is fid.frechet_distance of the merged features."""
    from samplers.evaluation import fid

    rng = np.random.default_rng(0)
    blocks = [{"pixel_features": rng.normal(size=(6, 3))} for _ in range(3)]
    target = metrics.PixelTarget((np.zeros(3), np.eye(3)), None)
    feats = np.concatenate([b["pixel_features"] for b in blocks])
    expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), np.zeros(3), np.eye(3))
    value = metrics.PixelFD({"pixel_resolution": 8}).reduce(blocks, target, None)["pixel_fd"]
    assert value == pytest.approx(expected, rel=1e-10)
    assert torch.is_tensor(metrics.pixel_features(torch.zeros(2, 3, 16, 16), 8))


def test_error_summary_closed_form():
    """numpy's median (mean of the two middle values), linear p90, RMS, and the mean of the worst 10 % that the
    tuning objective can add (``tail_weight``); any non-finite error makes every field inf."""
    from samplers.evaluation.quality import ErrorSummary

    s = ErrorSummary.of(torch.arange(1.0, 21.0))
    assert (s.median, s.p90, s.tail) == (10.5, pytest.approx(18.1), 19.5)
    assert s.rms == pytest.approx((sum(k * k for k in range(1, 21)) / 20) ** 0.5)
    assert s.objective == pytest.approx(10.5 + 18.1) and s.score(1.0) == pytest.approx(10.5 + 18.1 + 19.5)
    assert ErrorSummary.of(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)).tail == 0.3  # at least one sample
    assert ErrorSummary.of(torch.tensor([0.1, float("nan")])).objective == float("inf")
