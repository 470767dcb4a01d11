"""scripts/bench_speed.py runs end to end (tiny settings) and its device-independent counts hold: the project's
solver loops read nothing back on the host and launch fewer ops per step than diffusers' peers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_speed.py"


def test_bench_speed_runs_and_counts_no_host_reads_for_ours(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--device", "cpu", "--batch", "1", "--nfe", "3", "--repeats", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 6 and (tmp_path / "results.csv").is_file()
    for row in rows:
        assert row["ours_host_reads_per_run"] == 0 < row["diffusers_host_reads_per_run"], row["solver"]
        assert row["ours_ops_per_step"] < row["diffusers_ops_per_step"], row["solver"]
        assert row["ours_host_ms"] > 0 and row["model_ms"] > 0
