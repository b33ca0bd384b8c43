"""launch/*.sh: --help, --dry-run output (parsed back with shlex, as a shell would), argument passthrough, errors for
missing arguments, and two real runs of local_multiprocess.sh (a fake interpreter; jax.distributed on CPU)."""

import os
import pathlib
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("tpu_pod.sh", "slurm_gpu.sh", "single_host_gpu.sh", "local_multiprocess.sh", "prepare_wheels.sh")


def run(script, *args, env=None, check=True):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(env or {})
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=base,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """Non-comment output lines, each split as a shell would split it."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_strict_mode(script):
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    assert os.access(LAUNCH / script, os.X_OK), f"{script} is not executable"
    out = run(script, "--help").stdout
    assert out.startswith("Usage: launch/" + script)
    assert "--dry-run" in out


@pytest.mark.parametrize("script,args,missing", [
    ("tpu_pod.sh", ["--name", "t", "--config", "c.py"], ["--zone", "--workdir"]),
    ("slurm_gpu.sh", ["--config", "c.py", "--workdir", "/w"], ["--nodes", "--gpus-per-node"]),
    ("single_host_gpu.sh", ["--workdir", "/w"], ["--config"]),
    ("local_multiprocess.sh", ["--config", "c.py"], ["--workdir"]),
    ("prepare_wheels.sh", [], ["--dest"]),
])
def test_missing_required_arguments(script, args, missing):
    proc = run(script, *args, "--dry-run", check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    for name in missing:
        assert name in proc.stderr


@pytest.mark.parametrize("script,args,message", [
    ("tpu_pod.sh", ["--name", "t", "--zone"], "--zone needs a value"),
    ("slurm_gpu.sh", ["--config", "c", "--workdir", "w", "--nodes", "two", "--gpus-per-node", "8"], "--nodes"),
    ("local_multiprocess.sh", ["--config", "c", "--workdir", "w", "--num-processes", "0"], "--num-processes"),
    ("single_host_gpu.sh", ["--config", "c", "--workdir", "w", "--gpus", "a,b"], "--gpus"),
    ("prepare_wheels.sh", ["--dest", "d", "--python-version", "312"], "--python-version"),
    ("prepare_wheels.sh", ["--dest", "d", "--extras", "nosuchextra"], "nosuchextra"),
])
def test_bad_values_are_named(script, args, message):
    proc = run(script, *args, "--dry-run", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_tpu_pod_same_train_command_on_every_worker():
    workdir = "gs://bucket/run one's"  # a space and a quote must survive two levels of shell quoting
    out = run("tpu_pod.sh", "--name", "pod-1", "--zone", "us-east5-a", "--project", "proj", "--config",
              "configs/qwen3b_gdn.py", "--workdir", workdir, "--dry-run", "--config.train.steps=7", "--install",
              "--", "--peak_tflops=459").stdout
    (cmd,) = commands(out)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert cmd[cmd.index("--zone") + 1] == "us-east5-a"
    assert cmd[cmd.index("--project") + 1] == "proj"
    assert "--worker=all" in cmd
    remote = shlex.split(cmd[cmd.index("--command") + 1])
    assert remote[:3] == ["cd", "ahn_jax", "&&"]
    assert "pip" in remote and ".[tpu]" in remote
    train = remote[remote.index("ahn_jax.train") - 2:]
    assert train == ["python3", "-m", "ahn_jax.train", "--config=configs/qwen3b_gdn.py", f"--workdir={workdir}",
                     "--distributed", "--config.train.steps=7", "--peak_tflops=459"]
    assert not any(a.startswith("--coordinator") or a.startswith("--process_id") for a in remote)


def test_slurm_submission_resubmits_itself_with_the_same_arguments():
    out = run("slurm_gpu.sh", "--nodes", "2", "--gpus-per-node", "8", "--config", "configs/qwen3b_gdn.py",
              "--workdir", "/shared/run", "--partition", "gpu", "--time", "04:00:00", "--per-gpu", "--dry-run",
              "--config.train.steps=9").stdout
    (cmd,) = commands(out)
    assert cmd[0] == "sbatch"
    assert {"--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--partition=gpu", "--time=04:00:00"} <= set(cmd)
    script = cmd.index(str(LAUNCH / "slurm_gpu.sh"))
    inner = cmd[script + 1:]
    assert "--config=configs/qwen3b_gdn.py" in inner and "--workdir=/shared/run" in inner
    assert "--per-gpu" in inner and f"--repo={ROOT}" in inner
    assert inner[inner.index("--") + 1:] == ["--config.train.steps=9"]
    one_per_node = commands(run("slurm_gpu.sh", "--nodes", "3", "--gpus-per-node", "4", "--config", "c.py",
                                "--workdir", "/w", "--dry-run").stdout)[0]
    assert "--ntasks-per-node=1" in one_per_node and "--nodes=3" in one_per_node


def _slurm_job_env(nodelist, ntasks):
    return {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": str(ntasks),
            "SLURM_SUBMIT_DIR": str(ROOT), "PATH": "/usr/bin:/bin"}  # no scontrol: the script's own parser runs


@pytest.mark.parametrize("nodelist,first", [("gpu[07-10,12],big1", "gpu07"), ("a1,b[1-2]", "a1"), ("solo", "solo")])
def test_slurm_inside_job_srun_with_coordinator_and_process_ids(nodelist, first):
    out = run("slurm_gpu.sh", "--config", "configs/tiny_gdn.py", "--workdir", "/w", "--port", "23456", "--dry-run",
              "--python", "echo", "--", "--config.train.steps=3", "--config.data.path=a b",
              env=_slurm_job_env(nodelist, 4)).stdout
    (cmd,) = commands(out)
    assert cmd[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks=4", "bash"]
    task = cmd[cmd.index("-c") + 1]
    assert f"--coordinator={first}:23456" in task and "--num_processes=4" in task
    # Run the per-task shell as srun would, with `echo` as the interpreter: each task gets its own process id.
    for procid in (0, 3):
        res = subprocess.run(["bash", "-c", task], capture_output=True, text=True, check=True,
                             env={"SLURM_PROCID": str(procid), "PATH": "/usr/bin:/bin"})
        assert res.stdout.startswith("-m ahn_jax.train --config=configs/tiny_gdn.py --workdir=/w ")
        assert res.stdout.strip().endswith(f"--process_id={procid} --config.train.steps=3 --config.data.path=a b")


def test_slurm_per_gpu_task_sees_one_gpu(tmp_path):
    fake = _fake_python(tmp_path, """
        import os
        print("VISIBLE", os.environ["CUDA_VISIBLE_DEVICES"])
    """)
    out = run("slurm_gpu.sh", "--config", "c.py", "--workdir", "/w", "--per-gpu", "--dry-run", "--python", fake,
              env=_slurm_job_env("n[1-2]", 16)).stdout
    task = commands(out)[0][-1]
    for visible, localid, expect in (("4,5,6,7", 2, "6"), (None, 3, "3")):
        env = {"SLURM_PROCID": "9", "SLURM_LOCALID": str(localid), "PATH": "/usr/bin:/bin"}
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = visible
        res = subprocess.run(["bash", "-c", task], capture_output=True, text=True, env=env, check=True)
        assert res.stdout.strip() == f"VISIBLE {expect}"


def test_single_host_gpu():
    out = run("single_host_gpu.sh", "--config", "configs/qwen3b_gdn.py", "--workdir", "/tmp/w", "--gpus", "0,1",
              "--mem-fraction", "0.9", "--peak-tflops", "989", "--dry-run", "--config.train.steps=3").stdout
    cd, cmd = commands(out)
    assert cd == ["cd", str(ROOT)]
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "python3", "-m",
                   "ahn_jax.train", "--config=configs/qwen3b_gdn.py", "--workdir=/tmp/w", "--peak_tflops=989",
                   "--config.train.steps=3"]


def test_local_multiprocess_dry_run():
    out = run("local_multiprocess.sh", "--config", "configs/tiny_gdn.py", "--workdir", "/tmp/w",
              "--num-processes", "3", "--devices-per-process", "2", "--port", "4567", "--dry-run",
              "--config.train.steps=2", env={"XLA_FLAGS": "--xla_dump_to=/tmp/x "
                                                          "--xla_force_host_platform_device_count=8"}).stdout
    cd, *procs = commands(out)
    assert cd == ["cd", str(ROOT)] and len(procs) == 3
    for i, cmd in enumerate(procs):
        assert cmd[:3] == ["env", "JAX_PLATFORMS=cpu",
                           "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"]
        assert cmd[3:] == ["python3", "-m", "ahn_jax.train", "--config=configs/tiny_gdn.py", "--workdir=/tmp/w",
                           "--coordinator=localhost:4567", "--num_processes=3", f"--process_id={i}",
                           "--config.train.steps=2"]


def _fake_python(tmp_path, body):
    path = tmp_path / "fake_python"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_local_multiprocess_runs_every_process_and_reports_failures(tmp_path):
    fake = _fake_python(tmp_path, """
        import os, sys
        pid = [a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1]
        print("ARGS", " ".join(sys.argv[1:]), "XLA", os.environ["XLA_FLAGS"])
        sys.exit(3 if pid == os.environ.get("FAIL_ID") else 0)
    """)
    args = ["--config", "c.py", "--workdir", str(tmp_path / "w"), "--num-processes", "3", "--python", fake,
            "--config.train.steps=1"]
    run("local_multiprocess.sh", *args)
    for i in range(3):
        log = (tmp_path / "w" / "logs" / f"process_{i}.log").read_text()
        assert f"--process_id={i}" in log and "--config.train.steps=1" in log
        assert "--xla_force_host_platform_device_count=1" in log
    proc = run("local_multiprocess.sh", *args, env={"FAIL_ID": "1"}, check=False)
    assert proc.returncode == 3
    assert "exited with status 3" in proc.stderr


def test_local_multiprocess_jax_distributed_on_cpu(tmp_path):
    """Two real processes with 2 fake devices each join through the coordinator and see 4 devices."""
    fake = _fake_python(tmp_path, """
        import sys
        flags = dict(a[2:].split("=", 1) for a in sys.argv if a.startswith("--") and "=" in a)
        import jax
        jax.distributed.initialize(flags["coordinator"], int(flags["num_processes"]), int(flags["process_id"]))
        print("DEVICES", jax.process_index(), jax.device_count(), jax.local_device_count())
        jax.distributed.shutdown()
    """)
    port = str(20000 + os.getpid() % 20000)
    run("local_multiprocess.sh", "--config", "c.py", "--workdir", str(tmp_path / "w"), "--devices-per-process", "2",
        "--port", port, "--python", fake)
    for i in range(2):
        log = (tmp_path / "w" / "logs" / f"process_{i}.log").read_text()
        assert f"DEVICES {i} 4 2" in log, log


def test_prepare_wheels_dry_run_lists_pyproject_dependencies():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = run("prepare_wheels.sh", "--dest", "/tmp/wheels dir", "--python-version", "3.12", "--extras", "gpu",
              "--dry-run").stdout
    mkdir, own, download = commands(out)
    assert mkdir == ["mkdir", "-p", "/tmp/wheels dir"]
    assert own == ["python3", "-m", "pip", "wheel", "--no-deps", "--wheel-dir", "/tmp/wheels dir", str(ROOT)]
    assert download[:4] == ["python3", "-m", "pip", "download"]
    assert download[download.index("--dest") + 1] == "/tmp/wheels dir"
    assert download[download.index("--python-version") + 1] == "3.12"
    assert download[download.index("--platform") + 1] == "manylinux_2_28_x86_64"
    assert "--only-binary=:all:" in download
    wanted = project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert download[-len(wanted):] == wanted
    install = [line for line in out.splitlines() if "--no-index" in line]
    assert install and "--find-links '/tmp/wheels dir' 'ahn-jax[gpu]'" in install[0]


def test_prepare_wheels_named_packages_only():
    out = run("prepare_wheels.sh", "--dest", "/w", "--packages", "grain ml-collections", "--platform",
              "manylinux_2_28_aarch64", "--dry-run").stdout
    mkdir, download = commands(out)
    assert download[-2:] == ["grain", "ml-collections"]
    assert download[download.index("--platform") + 1] == "manylinux_2_28_aarch64"
    assert "wheel" not in download
