"""bin/launch: the command line for each MPI flavour (--dry-run), hostfile parsing, the
refusal of a hostfile that does not give the ranks asked for, and one real local launch."""
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "bin", "launch")
PAPER_HOSTS = os.path.join(ROOT, "hostfiles", "paper-32x8.example")
LOCAL_HOSTS = os.path.join(ROOT, "hostfiles", "localhost")
BIN = os.path.dirname(sys.executable)
MPIEXEC = shutil.which("mpiexec", path=BIN) or shutil.which("mpiexec")


def load_launch():
    loader = importlib.machinery.SourceFileLoader("spmd_moe_launch", LAUNCH)
    spec = importlib.util.spec_from_loader("spmd_moe_launch", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


launch = load_launch()


def run_launch(*args, env=None, timeout=60):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})})


def dry_run(*args, env=None):
    result = run_launch("--dry-run", "--program", "spmd-moe", *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0]), result.stderr


def flag(command, name):
    """The value after ``name`` in ``command``."""
    return command[command.index(name) + 1]


# --- command lines --------------------------------------------------------------------

def test_open_mpi_command_line():
    command, note = dry_run("--mpi", "openmpi", "--hostfile", PAPER_HOSTS, "--layout",
                            "ep=16,pp=16", "--", "run", "--preset", "paper",
                            env={"SPMD_MOE_CUDA_AWARE": "1"})
    assert command[:3] == ["mpirun", "-np", "256"]
    assert flag(command, "--hostfile") == PAPER_HOSTS
    assert flag(command, "--map-by") == "ppr:8:node"
    assert flag(command, "--bind-to") == "numa"
    exported = [command[i + 1] for i, a in enumerate(command) if a == "-x"]
    assert "PATH" in exported and "SPMD_MOE_CUDA_AWARE" in exported
    assert command[-6:] == ["spmd-moe", "run", "--preset", "paper", "--layout", "ep=16,pp=16"]
    assert "openmpi: 256 ranks on 32 of 32 node(s)" in note and "8 per node" in note


def test_open_mpi_cores_per_rank_and_colon_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu1:4\ngpu2:4\n")
    command, _ = dry_run("--mpi", "openmpi", "--hostfile", str(hosts), "--np", "8",
                         "--cpus-per-rank", "6", "--", "info")
    # Open MPI hostfiles have no host:N syntax: the hosts go inline.
    assert flag(command, "--host") == "gpu1:4,gpu2:4" and "--hostfile" not in command
    assert flag(command, "--map-by") == "ppr:4:node:PE=6"
    assert flag(command, "--bind-to") == "core"
    assert command[-2:] == ["spmd-moe", "info"]


def test_mpich_command_line():
    command, note = dry_run("--mpi", "mpich", "--hostfile", PAPER_HOSTS, "--layout",
                            "tp=8,pp=2", "--bind", "core", "--", "run", "--preset",
                            "paper-baseline")
    assert command[:3] == ["mpiexec", "-n", "16"]
    # Hydra hostfiles have no slots=N syntax: the hosts go inline.
    assert flag(command, "-hosts").split(",")[:2] == ["node001:8", "node002:8"]
    assert len(flag(command, "-hosts").split(",")) == 32
    assert flag(command, "-ppn") == "8" and flag(command, "-bind-to") == "core"
    assert command[-3:] == ["paper-baseline", "--layout", "tp=8,pp=2"]
    assert "mpich: 16 ranks on 2 of 32 node(s)" in note


def test_mpich_colon_hostfile_is_passed_as_is(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nn1:8\n\nn2:8   # the second\n")
    command, _ = dry_run("--mpi", "mpich", "--hostfile", str(hosts), "--layout", "ep=16",
                         "--env", "NCCL_DEBUG", "--", "run")
    assert flag(command, "-f") == str(hosts)
    assert flag(command, "-genvlist") == "NCCL_DEBUG"


def test_slurm_command_line():
    env = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "256", "SLURM_JOB_NUM_NODES": "32"}
    command, note = dry_run("--layout", "ep=16,pp=16", "--ranks-per-node", "8", "--",
                            "run", "--preset", "paper", env=env)
    assert command[0] == "srun"
    assert "--ntasks=256" in command and "--ntasks-per-node=8" in command
    assert "--gpus-per-task=1" in command and "--cpu-bind=ldoms" in command
    assert "--kill-on-bad-exit=1" in command
    assert note.startswith("bin/launch: slurm:")
    # A Slurm allocation too small is refused like a hostfile.
    result = run_launch("--dry-run", "--layout", "ep=16,pp=16", "--", "run",
                        env={"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16"})
    assert result.returncode == 2
    assert "Slurm allocation gives 16 tasks" in result.stderr


def test_detects_the_local_mpich():
    assert MPIEXEC, "mpiexec from the mpich wheel should be installed"
    _, note = dry_run("--mpiexec", MPIEXEC, "--hostfile", LOCAL_HOSTS, "--layout", "ep=2",
                      "--", "run", "--preset", "tiny")
    assert note.startswith("bin/launch: mpich:")
    assert launch.detect_flavour(MPIEXEC) == "mpich"


def test_compare_gets_the_layout_as_its_ep_or_baseline_layout():
    command, _ = dry_run("--mpi", "mpich", "--hostfile", LOCAL_HOSTS, "--layout", "ep=4",
                         "--", "compare", "--preset", "tiny")
    assert command[-2:] == ["--ep-layout", "ep=4"]
    command, _ = dry_run("--mpi", "mpich", "--hostfile", LOCAL_HOSTS, "--layout",
                         "tp=2,pp=2", "--", "compare", "--preset", "tiny")
    assert command[-2:] == ["--baseline-layout", "tp=2,pp=2"]
    command, _ = dry_run("--mpi", "mpich", "--hostfile", LOCAL_HOSTS, "--np", "3", "--",
                         "python", "-c", "print(1)")
    assert command[-3:] == ["python", "-c", "print(1)"]


# --- hostfiles ---------------------------------------------------------------------------

def test_hostfile_syntaxes(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# comment\n\n  a slots=4 max_slots=8  # trailing\nb slots=2\na slots=1\n"
                    "c\n")
    hosts = launch.parse_hostfile(str(path))
    assert hosts.hosts == [("a", 5), ("b", 2), ("c", 1)]
    assert hosts.slots == 8 and hosts.style == "slots" and hosts.uniform_slots is None
    path.write_text("a:8\nb:8 ifhn=ib0\n")
    hosts = launch.parse_hostfile(str(path))
    assert hosts.hosts == [("a", 8), ("b", 8)] and hosts.style == "colon"
    assert hosts.uniform_slots == 8 and hosts.inline() == "a:8,b:8"


def test_shipped_hostfiles():
    paper = launch.parse_hostfile(PAPER_HOSTS)
    assert len(paper.hosts) == 32 and paper.slots == 256 and paper.uniform_slots == 8
    local = launch.parse_hostfile(LOCAL_HOSTS)
    assert local.hosts[0][0] == "localhost" and local.slots >= 16


@pytest.mark.parametrize("text,message", [
    ("a slots=0\n", "slot count '0'"),
    ("a slots=x\n", "slot count 'x'"),
    ("a:\n", "slot count ''"),
    ("a cpus=4\n", "'cpus=4' is not slots=N"),
    ("a slots=2\nb:2\n", "mixes"),
    ("# nothing\n\n", "names no host"),
    ("a/b slots=2\n", "not a host name"),
])
def test_bad_hostfiles_are_refused(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(launch.LaunchError, match=message):
        launch.parse_hostfile(str(path))
    result = run_launch("--dry-run", "--mpi", "mpich", "--hostfile", str(path), "--np", "1",
                        "--", "run")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("bin/launch: error: --hostfile:")


def test_layout_rank_counts():
    assert launch.ranks_of_layout("ep=16,pp=16") == 256
    assert launch.ranks_of_layout("tp=8,pp=2") == 16
    assert launch.ranks_of_layout("ep=4") == 4
    for bad in ("ep=0", "ep=2,tp=2", "xp=2", "ep=two", ""):
        with pytest.raises(launch.LaunchError, match="--layout"):
            launch.ranks_of_layout(bad)


# --- refusals ----------------------------------------------------------------------------

def test_refuses_a_hostfile_without_the_ranks_asked_for():
    result = run_launch("--dry-run", "--mpi", "openmpi", "--hostfile", PAPER_HOSTS,
                        "--layout", "ep=16,pp=32", "--", "run", "--preset", "paper")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"bin/launch: error: --hostfile: {PAPER_HOSTS} gives 256 slots on 32 node(s) but "
        "layout ep=16,pp=32 needs 512 ranks; add hosts or slots, or use a smaller layout"]


@pytest.mark.parametrize("args,message", [
    (["--np", "4", "--layout", "ep=2"], "--np: 4 ranks but layout ep=2 needs 2"),
    ([], "--layout: give the layout"),
    (["--layout", "ep=2", "--ranks-per-node", "32"], "--ranks-per-node: 32"),
    (["--layout", "ep=2", "--mpi", "mpich", "--"], "command: nothing to run"),
])
def test_other_refusals(args, message):
    hostfile = [] if "--hostfile" in args else ["--hostfile", LOCAL_HOSTS]
    tail = [] if args and args[-1] == "--" else ["--", "run"]
    result = run_launch("--dry-run", "--mpi", "mpich", *hostfile, *args, *tail)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_hostfile_outside_slurm_is_refused():
    result = run_launch("--dry-run", "--mpi", "openmpi", "--np", "2", "--", "run")
    assert result.returncode == 2 and "--hostfile: needed outside Slurm" in result.stderr


# --- a real launch -----------------------------------------------------------------------

def test_real_local_launch_runs_tiny_on_two_ranks():
    env = {"PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    result = run_launch("--hostfile", LOCAL_HOSTS, "--layout", "ep=2", "--mpiexec", MPIEXEC,
                        "--", "run", "--preset", "tiny", env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "layout ep=2,pp=1 on 2 rank(s)" in result.stdout
    assert "tokens/s" in result.stdout
