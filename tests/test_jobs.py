"""`ray job submit` against a token-authenticated head node on 127.0.0.1 (Ray 2.60 token auth)."""
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_RUN

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one Ray test process at a time

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_JOB = TINY_RUN + ["train.threads=1"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _own_processes(marker: str) -> list[int]:
    """Processes whose command line names our private temp folder: the ones this head node started."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


@pytest.fixture
def token_cluster():
    """A head node bound to 127.0.0.1 with token auth, on ports of its own; stopped by killing only its own
    processes (`ray stop` would stop every Ray node of this user on the machine)."""
    tmp = Path(tempfile.mkdtemp(prefix="tj", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    (tmp / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(HOME=str(tmp / "home"), PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_file))
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, objects, node = _free_ports(9)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--object-manager-port={objects}",
         f"--node-manager-port={node}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp}/ray",
         "--disable-usage-stats"],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the job server answers once the dashboard is up
            status = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                    capture_output=True, text=True)
            if status.returncode == 0:
                break
            assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            time.sleep(3)
        else:
            pytest.fail(f"the head node did not come up in 300 s:\n{(tmp / 'head.log').read_text()[-3000:]}")
        yield dict(env=env, address=address, tmp=tmp)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [head.pid, *_own_processes(str(tmp))]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3 if sig == signal.SIGTERM else 0)
        head.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_token_authenticated_job_submission(token_cluster, tmp_path):
    import mlflow

    env, address, tmp = token_cluster["env"], token_cluster["address"], token_cluster["tmp"]
    job_dir = tmp / "job"  # the --working-dir the job runs in (uploaded by Ray): the config only
    job_dir.mkdir()
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in TINY_JOB)}
    overrides.update({"output_dir": str(tmp_path / "run"), "tracking.experiment": "jobs",
                      "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                      "tracking.artifact_root": str(tmp_path / "mlruns" / "artifacts")})
    nested: dict = {"base": str(REPO / "experiments" / "synthetic.yaml")}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (job_dir / "tiny.yaml").write_text(yaml.safe_dump(nested))
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--",
              "toco", "train", "tiny.yaml", "--workers", "2"]

    # without the token, and with a wrong one, the job server refuses the submission
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run(submit, env=no_token, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert any(w in (refused.stdout + refused.stderr).lower() for w in ("auth", "401", "unauthorized"))
    wrong = dict(no_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    assert subprocess.run(submit, env=wrong, capture_output=True, text=True, timeout=300).returncode != 0

    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in log, log[-4000:]
    listed = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True, text=True)
    # the refused submissions never became jobs
    assert listed.stdout.count("submission_id=") == 1 and "JobStatus.SUCCEEDED" in listed.stdout, listed.stdout

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/cls")] == [2, 4]
    assert "val/miou_seg" in runs[0].data.metrics
