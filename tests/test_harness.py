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
    assert launches == ['    SPMD_MOE_TEST_WORLD_SIZE=$n mpiexec -n "$n" "${MPI_PYTEST[@]}" '
                        '"$@"'], launches
    phases = [line for line in script if line.lstrip().startswith("mpi ")]
    assert len(phases) == 3, phases       # 2/3/4 ranks, 8 ranks, 16 ranks
