"""Shared test set-up.

- Under ``mpiexec -n N`` (N > 1), a failing test aborts the whole MPI job: otherwise the
  failing rank leaves the others waiting forever in the next collective.
- ``SPMD_MOE_TEST_WORLD_SIZE=N`` (bin/run-tests sets it for each mpiexec phase): the run
  fails at once unless the world really has N ranks. A launcher that did not give the
  ranks would otherwise run every multi-rank test at size 1, skip them all, and pass.
- ``@pytest.mark.gpu`` tests are skipped cleanly unless a CUDA device is usable.
- Every test has a time limit (pytest-timeout: ``timeout`` in pyproject.toml, stricter
  ``--timeout`` for bin/run-tests' MPI phases). Under mpiexec a hung rank sits in a C-level
  MPI call where no signal handler runs, so each rank's limit is a thread of its own here:
  it names the test and aborts every rank (a deadlock fails the suite with its name
  instead of stalling it until CI's limit).
- ``fake_gpu``: the asynchronous fake CUDA device, active for one test; ``device``: (array
  module, FusedKernels) for the kernel tests, on the fake device and, where a CUDA device
  is usable, on the compiled kernels.
"""
from __future__ import annotations

import os
import sys
import threading

import pytest

WORLD_SIZE_ENV = "SPMD_MOE_TEST_WORLD_SIZE"


def _world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def gpu_available() -> bool:
    from spmd_moe.backend.array import probe_cupy

    return probe_cupy()[0] is not None


def pytest_configure(config):
    expected = os.environ.get(WORLD_SIZE_ENV)
    if expected:
        size = _world().Get_size()
        if str(size) != expected:
            pytest.exit(f"{WORLD_SIZE_ENV}={expected} but the MPI world has {size} rank(s): "
                        "the launcher did not start the ranks asked for", returncode=3)


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not gpu_available():
        skip = pytest.mark.skip(reason="no usable CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        world = _world()
        if world.Get_size() > 1:
            print(f"\n[rank {world.Get_rank()}] {item.nodeid} failed:\n{report.longreprtext}",
                  file=sys.stderr, flush=True)
            world.Abort(1)


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item, settings):
    """Under mpiexec: a thread that, when the test outlives its limit, names it and aborts
    the job (watchdog.abort: from any thread, every rank). Alone: pytest-timeout's own."""
    world = _world()
    if world.Get_size() == 1 or not settings.timeout:
        return None

    def expire():
        from spmd_moe.parallel.watchdog import abort

        capture = item.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:           # the line goes to the real stderr, not pytest's
            capture.suspend_global_capture(in_=True)
        abort(world, 1, f"[rank {world.Get_rank()}] {item.nodeid} ran past its time limit "
                        f"of {settings.timeout:g} s (a hang?): aborting every rank")

    timer = threading.Timer(settings.timeout, expire)
    timer.daemon = True
    timer.start()
    item.mpi_timer = timer
    return True


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item):
    timer = getattr(item, "mpi_timer", None)
    if timer is None:
        return None
    timer.cancel()
    return True
@pytest.fixture
def fake_gpu():
    """The asynchronous fake CUDA device (tests/fakes/device.py), active for the test."""
    from fakes.device import FakeDevice

    with FakeDevice(seed=0) as device:
        yield device


@pytest.fixture(params=["fake", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request):
    """(array module, FusedKernels): the NumPy emulations behind the real launch code on
    the fake device, and, where a CUDA device is usable, the compiled kernels."""
    if request.param == "fake":
        from fakes.cupy import FakeCupy
        from fakes.kernels import make_fake_fused

        request.getfixturevalue("fake_gpu")
        return FakeCupy(), make_fake_fused()
    import cupy

    from spmd_moe.backend import kernels

    loaded, reason = kernels.load_kernels()
    assert loaded is not None, reason
    return cupy, loaded
