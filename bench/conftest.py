"""Benchmarks (pytest-benchmark), outside the default `pytest` run:

    pytest bench --benchmark-only --benchmark-autosave          # record a baseline
    pytest bench --benchmark-only --benchmark-compare --benchmark-compare-fail=min:15%

Models are random-weight checkpoints at real GPT-2 shapes built on the fly (timings do not depend
on weight values), so the suite runs offline. Compile time is kept out of every timing (each
workload runs once before it is timed). Each result's extra_info records the numba version,
threading layer, thread count, NumPy's BLAS and its core type, and the achieved throughput.
Nothing here asserts a wall-clock time: compare runs with --benchmark-compare on one machine.
"""

from __future__ import annotations

import os

import numba
import pytest

from picogpt_fast import GPT2, GPT2Config
from picogpt_fast.benchmark import machine_info
from picogpt_fast.weights import random_weights


def pytest_collection_modifyitems(items):
    for item in items:  # benchmarks run in file order, kernels first
        item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """The benchmarks' converted weights go to a cache of the session's own (inherited by the
    servers and Ray workers they start), never into the user's, where each run would leave GBs."""
    os.environ["PICOGPT_FAST_CACHE"] = str(tmp_path_factory.mktemp("weights-cache"))


@pytest.fixture(scope="session")
def config124() -> GPT2Config:
    return GPT2Config.from_shape("124M")


@pytest.fixture(scope="session")
def weights124(config124):
    return random_weights(config124, seed=0, std=0.02)


@pytest.fixture(scope="session")
def engine124(config124, weights124) -> GPT2:
    return GPT2(config124, weights124, backend="numba")


@pytest.fixture(scope="session")
def reference124(config124, weights124) -> GPT2:
    return GPT2(config124, weights124, backend="numpy")


@pytest.fixture(scope="session")
def machine() -> dict:
    info = machine_info(numba.get_num_threads())
    blas = info.pop("blas")
    info["blas"] = f"{blas.get('internal_api')} {blas.get('version')} ({blas.get('architecture')}, {blas.get('num_threads')} threads)"
    info.update(OPENBLAS_CORETYPE=blas.get("OPENBLAS_CORETYPE"), OPENBLAS_L2_SIZE=blas.get("OPENBLAS_L2_SIZE"))
    return info


@pytest.fixture
def record(benchmark, machine):
    """record(group, **extra): name the comparison group and store machine info + throughput."""

    def set_(group: str, **extra):
        benchmark.group = group
        benchmark.extra_info.update(machine)
        benchmark.extra_info.update(extra)

    return set_


def throughput(benchmark, amount: float, unit: str) -> None:
    """After a run: amount per second at the fastest round (units: GB/s, GFLOP/s, tok/s, MB/s)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.min > 0:
        benchmark.extra_info[unit] = round(amount / stats.stats.min, 3)
