"""The sweep CLI on 1 process (killed mid-way with SIGKILL, then resumed) and under torchrun on 2 processes
(gloo, CPU): identical artifacts and identical metrics; work item k ran on rank k % 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from samplers.evaluation import sweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sweep.py"
GRID = {
    "models": [{"name": "gmm", "label": "gmm8", "shape": [3, 8, 8], "num_components": 4, "std": 0.2}],
    "solvers": [{"name": "dpmsolver++", "solver_order": 2}, "diffusers:DPMSolverMultistepScheduler"],
    "nfe": [3, 6],
    "seeds": {"start": 5, "num_blocks": 3, "block_size": 4},
    "reference": {"solver": {"name": "dpmsolver++", "solver_order": 3}, "nfe": 30},
    "metric": {"pixel_resolution": 4, "image_grid": 2},
}
TIMING = ("seconds", "images_per_s")
RUN_ONLY = ("seconds", "rank", "device")  # artifact fields that describe the run, not the samples


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def artifacts(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.glob("*/*/block_*.npz"))}


def metrics(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    return path


@pytest.fixture(scope="module")
def killed_and_resumed(config, tmp_path_factory):
    """One process, SIGKILLed as soon as its first artifact is on disk, then rerun to completion."""
    out = tmp_path_factory.mktemp("one_process")
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not artifacts(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = {name: p.stat().st_mtime_ns for name, p in artifacts(out).items()}
    assert before and not (out / "results.json").exists(), "the sweep must be interrupted mid-way"
    resumed = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    return out, before, resumed.stderr + resumed.stdout  # progress on stderr, tables and throughput on stdout


@pytest.fixture(scope="module")
def two_processes(config, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), "--out", str(out), "--config", str(config)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_killed_sweep_resumes_without_redoing_finished_blocks(killed_and_resumed):
    out, before, log = killed_and_resumed
    total = len(artifacts(out))
    assert total == 3 + 2 * 2 * 3  # reference blocks + solvers x NFE x blocks
    assert f"resuming: {len(before)} of {total} blocks already done, skipping them" in log
    assert {name: p.stat().st_mtime_ns for name, p in artifacts(out).items() if name in before} == before
    assert not list(out.rglob("*.tmp")), "temp files of the killed run must be cleaned up"
    assert (out / "results.md").is_file() and "  gmm8: NFE 3: 24 images in " in log


def test_one_and_two_processes_give_identical_samples_and_metrics(killed_and_resumed, two_processes):
    one, two = killed_and_resumed[0], two_processes
    assert artifacts(one).keys() == artifacts(two).keys()
    for name, path in artifacts(one).items():
        a, b = np.load(path), np.load(two / name)
        assert a.files == b.files
        for key in set(a.files) - set(RUN_ONLY):
            assert np.array_equal(a[key], b[key]), f"{name}: {key} differs between 1 and 2 processes"
    assert metrics(one) == metrics(two)
    assert (one / "results.md").read_text().split("### Sampling throughput")[0] == \
        (two / "results.md").read_text().split("### Sampling throughput")[0]


def test_work_item_k_runs_on_rank_k_mod_world(config, killed_and_resumed, two_processes):
    grid = sweep.parse_grid(yaml.safe_load(config.read_text()))
    for jobs in sweep.work_list(grid):
        ranks = [int(np.load(sweep.artifact_path(two_processes, grid, job))["rank"]) for job in jobs]
        assert ranks == [k % 2 for k in range(len(jobs))]
        assert {int(np.load(sweep.artifact_path(killed_and_resumed[0], grid, j))["rank"]) for j in jobs} == {0}
    manifest = json.loads((two_processes / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and sum(map(len, manifest["done"].values())) == 15
