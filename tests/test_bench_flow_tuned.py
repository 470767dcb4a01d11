"""scripts/bench_flow.py's tuned section: every diffusers flow configuration it names builds what its name says and
runs, and on a tiny mixture (evaluation noises disjoint from tune's seeds) tuned UniPC beats stock SD3 Euler at
NFE 5 by median and p90."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_flow.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_flow", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_diffusers_flow_configs_are_what_they_name():
    configs = _bench().diffusers_flow_configs()
    assert len(configs) == 18
    for label, build in configs.items():
        scheduler = build()
        shift = float(label.rsplit(" ", 1)[1])
        config = scheduler.config
        if label.startswith("Euler"):
            assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and config.shift == shift
            assert config.use_karras_sigmas == ("Karras" in label)
        else:
            assert config.use_flow_sigmas and config.prediction_type == "flow_prediction"
            assert config.flow_shift == shift
            if label.startswith("DPM++"):
                assert config.solver_order == int(label[5])
        scheduler.set_timesteps(5)
        assert len(scheduler.timesteps) == 5, label
        assert float(scheduler.sigmas[0]) > 0.99, label
        # diffusers 0.42's DEIS with use_flow_sigmas keeps its last grid sigma as the final one (no jump to 0):
        # the bench measures it as diffusers runs it
        assert (float(scheduler.sigmas[-1]) > 0.1) if label.startswith("DEIS") else float(scheduler.sigmas[-1]) == 0


def test_tuned_section_runs_and_tuned_unipc_beats_stock_euler(tmp_path):
    bench = _bench()
    threads = torch.get_num_threads()
    try:
        bench.main(["--tables", "tuned", "--out", str(tmp_path), "--seeds", "0", "--tuned-sizes", "3x8x8",
                    "--tuned-nfes", "5", "--tuned-samples", "32", "--tune-budget", "300", "--teacher-steps", "60",
                    "--tune-noises", "16", "--ref-steps", "200"])
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "tuned.csv") as f:
        rows = {(r["seed"], r["scheduler"]): r for r in csv.DictReader(f)}
    for label in bench.diffusers_flow_configs():
        assert rows["0", label]["status"] == "ok", label
    euler, tuned = rows["all", "Euler shift 3"], rows["all", "UniPC tuned"]
    assert float(tuned["median"]) < float(euler["median"]) and float(tuned["p90"]) < float(euler["p90"])
    summary = json.loads((tmp_path / "tuned.json").read_text())["summary"]
    assert [(r["ours"], r["nfe"]) for r in summary] == [("UniPC", 5), ("DPM++2M", 5)]
