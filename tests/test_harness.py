"""The test harness itself: bin/run-tests cannot pass with multi-rank phases that did not
get their ranks."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_an_mpi_phase_without_its_ranks_fails_instead_of_skipping():
    # What a launcher that did not give the ranks looks like: world size 1. Every test of
    # tests/mpi would skip, and pytest would pass.
    env = {**os.environ, "SPMD_MOE_TEST_WORLD_SIZE": "2"}
    result = subprocess.run([sys.executable, "-m", "pytest", "--with-mpi", "-p",
                             "no:cacheprovider", "-q", "tests/mpi/test_layouts.py"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "SPMD_MOE_TEST_WORLD_SIZE=2 but the MPI world has 1 rank(s)" in (
        result.stdout + result.stderr)


def test_every_mpiexec_phase_of_run_tests_states_its_world_size():
    script = (ROOT / "bin" / "run-tests").read_text().splitlines()
    launches = [line for line in script if "mpiexec" in line and not line.lstrip()
                .startswith("#")]
    assert launches == ['    SPMD_MOE_TEST_WORLD_SIZE=$n timeout -k 30 "$MPI_PHASE_TIMEOUT" '
                        'mpiexec -n "$n" "${MPI_PYTEST[@]}" "$@" || status=$?'], launches
    assert any("--timeout=" in line for line in script if line.startswith("MPI_PYTEST="))
    phases = [line for line in script if line.lstrip().startswith("mpi ")]
    assert len(phases) == 3, phases       # 2/3/4 ranks, 8 ranks, 16 ranks


def test_every_test_has_a_time_limit():
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)
    assert project["tool"]["pytest"]["ini_options"]["timeout"] > 0
    assert any(dep.startswith("pytest-timeout") for dep in
               project["project"]["optional-dependencies"]["test"])


def test_a_hung_mpi_test_is_named_and_every_rank_ends(tmp_path):
    """A deadlock (rank 0 in a barrier rank 1 never enters) under mpiexec: the rank's time
    limit names the test and aborts the job, instead of the suite hanging in silence."""
    from test_cli import MPIEXEC

    (tmp_path / "test_hang.py").write_text(
        "from mpi4py import MPI\n\n\ndef test_deadlock():\n"
        "    if MPI.COMM_WORLD.Get_rank() == 0:\n        MPI.COMM_WORLD.barrier()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("SPMD_MOE_TEST_WORLD_SIZE", None)
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "pytest", "--with-mpi",
                             "-p", "no:cacheprovider", "-p", "conftest", "-q", "--timeout=3",
                             "test_hang.py"], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "test_hang.py::test_deadlock ran past its time limit of 3 s (a hang?): aborting " \
        "every rank" in result.stderr, result.stdout + result.stderr
