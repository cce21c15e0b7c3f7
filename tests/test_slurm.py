"""scripts/slurm_train.sh under a faked SLURM (srun and scontrol are stubs on PATH): the command it assembles,
and the preemption path (USR1 -> SIGTERM to the launchers -> requeue)."""
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_train.sh"


def fake_slurm(tmp_path: Path, srun_exit: str) -> dict:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    log.mkdir()
    (bin_ / "scontrol").write_text(f"""#!/bin/bash
echo "$@" >> {log}/scontrol
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a17\\ngpu-a18\\n'; fi
""")
    # srun: records its arguments; exits as told, or 75 on SIGTERM (what the trainer does when preempted)
    (bin_ / "srun").write_text(f"""#!/bin/bash
printf '%s\\n' "$@" > {log}/srun
trap 'echo TERM > {log}/srun_signal; kill %1 2>/dev/null; exit 75' TERM
{srun_exit}
""")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu-a[17-18]", GPUS_PER_NODE="8")
    return {"env": env, "log": log}


def test_slurm_script_assembles_one_launcher_per_node(tmp_path):
    fake = fake_slurm(tmp_path, "exit 0")
    r = subprocess.run(["bash", str(SCRIPT), "--rc", "rcs/rn50.yaml", "optim.epochs=100"], cwd=ROOT, env=fake["env"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (fake["log"] / "srun").read_text().split("\n")[:-1]
    assert args[:6] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", ".venv/bin/python"]
    cmd = " ".join(args)
    assert ("-m torch.distributed.run --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint "
            "gpu-a17:29500 --rdzv-id fastmveb-4242 --max-restarts 3 fastmveb/train.py --rc rcs/rn50.yaml "
            "optim.epochs=100") in cmd
    assert "requeue" not in (fake["log"] / "scontrol").read_text()


def test_slurm_script_requeues_on_preemption(tmp_path):
    fake = fake_slurm(tmp_path, "sleep 60 >/dev/null 2>&1 & wait")
    p = subprocess.Popen(["bash", str(SCRIPT), "--rc", "rcs/rn50.yaml"], cwd=ROOT, env=fake["env"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (fake["log"] / "srun").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGUSR1)                                     # SLURM's --signal=B:USR1@180
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert (fake["log"] / "srun_signal").read_text().strip() == "TERM"  # the launchers got SIGTERM
    assert "requeue 4242" in (fake["log"] / "scontrol").read_text()
    assert "requeueing job 4242" in out
