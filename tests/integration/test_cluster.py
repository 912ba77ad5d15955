"""Multi-node Ray: ``cluster.yaml`` against Ray's schema, and a real two-node cluster.

The integration test starts a head and a second node on this machine with ``ray start``,
submits the smoke run with ``ray job submit --working-dir`` (the workflow of
docs/cluster.md) and checks that its client actors ran on both nodes.

The cluster is private to the test: its own ``--temp-dir`` and ports, and ``RAY_ADDRESS``
removed from its environment, so it never joins (or is joined by) a Ray instance that other
tests started with ``ray.init()``. It is torn down by signalling the process groups of its
two ``ray start --block`` processes, never with ``ray stop``, which kills every Ray process
on the machine, other tests' and other users' included.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_CLI = VENV_BIN / "ray"
NODE_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0


# -- cluster.yaml ------------------------------------------------------------------------------


def _cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _pyproject_pin(name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.split("[")[0].split("=")[0] == name)


def test_cluster_yaml_validates_against_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before any cloud call: fill in the provider's defaults, then
    # validate against ray/autoscaler/ray-schema.json (and the cross-field checks).
    validate_config(prepare_config(copy.deepcopy(_cluster_config())))


def test_cluster_yaml_layout() -> None:
    cfg = _cluster_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head must advertise no GPU"
    assert head["resources"].get("CPU", 0) >= 1, "drivers and Tune run on the head"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name

    # The repository is synced to the nodes, and installed after the CUDA torch build.
    assert cfg["file_mounts"].get("~/umim") == "."
    setup = cfg["setup_commands"]
    torch_pin = _pyproject_pin("torch")
    torch_step = next(i for i, c in enumerate(setup)
                      if "pip install" in c and torch_pin in c and "download.pytorch.org" in c)
    umim_step = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ~/umim" in c)
    assert torch_step < umim_step

    # `ray up` runs with the local ray: it must be the version the nodes get from pyproject.
    import ray

    assert _pyproject_pin("ray").endswith(f"=={ray.__version__}")
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c
               for c in cfg["worker_start_ray_commands"])


# -- a local two-node cluster ------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now (held open together so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive_nodes(dashboard_url: str) -> int:
    """Alive nodes as the dashboard's state API reports them (0 while it is not up)."""
    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/v0/nodes?limit=100",
                                    timeout=5) as resp:
            rows = json.load(resp)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return sum(1 for n in rows if n.get("state") == "ALIVE")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


@dataclass
class LocalCluster:
    """A head and worker node started here; ``dashboard_url`` takes job submissions."""

    temp_dir: Path
    env: dict[str, str]
    gcs_port: int = 0
    dashboard_port: int = 0
    procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start_node(self, name: str, args: list[str], ports: list[int]) -> None:
        agent, agent_grpc, metrics, runtime_env_agent = ports
        log = self.temp_dir.parent / f"{self.temp_dir.name}.{name}.log"
        cmd = [str(RAY_CLI), "start", "--block", *args,
               "--num-cpus=1", f"--temp-dir={self.temp_dir}",
               "--object-store-memory=200000000", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env_agent}"]
        with log.open("wb") as out:
            # Its own process group (pgid == pid): the teardown signals exactly that group.
            proc = subprocess.Popen(cmd, env=self.env, cwd=self.temp_dir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((proc, log))

    def _wait(self, what: str, ready, timeout: float = NODE_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for proc, log in self.procs:
                if proc.poll() is not None:
                    pytest.fail(f"`ray start` exited with {proc.returncode} while waiting "
                                f"for {what}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {log}\n{_tail(log)}" for _, log in self.procs)
                pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n{logs}")
            time.sleep(0.5)

    def start(self) -> None:
        ports = _free_ports(11)
        self.gcs_port, self.dashboard_port, client_port = ports[:3]
        self._start_node("head", ["--head", f"--port={self.gcs_port}",
                                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={self.dashboard_port}",
                                  f"--ray-client-server-port={client_port}"], ports[3:7])
        # The second node only needs the GCS; it starts while the head's dashboard comes up.
        self._wait("the head's GCS", lambda: _port_open(self.gcs_port))
        self._start_node("worker", [f"--address=127.0.0.1:{self.gcs_port}"], ports[7:11])
        self._wait("two alive nodes", lambda: _alive_nodes(self.dashboard_url) >= 2)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM each node's process group (``ray start --block`` then stops its own
        processes; the raylet's workers are in the group too), SIGKILL whatever is left
        after ``grace_s``. Nothing outside these two groups is signalled."""
        for proc, _ in reversed(self.procs):  # the worker first, then the head
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_group_alive(p) for p, _ in self.procs):
            time.sleep(0.2)
        for proc, _ in self.procs:
            if _group_alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc, _ in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            leftover_deadline = time.monotonic() + 10.0
            while _group_alive(proc) and time.monotonic() < leftover_deadline:
                time.sleep(0.2)


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the `ray start` process itself once it exits
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the pgid was recycled by someone else
        return False
    return True


@pytest.fixture
def local_cluster(data_root: Path, shard_cache: Path) -> Iterator[LocalCluster]:
    if not sys.platform.startswith("linux"):
        pytest.skip("the process-group teardown is written for Linux")
    if not RAY_CLI.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    # Short, under /tmp: Ray's unix sockets live under the session dir (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="umim-ray-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0",
               UMIM_DATA_ROOT=str(data_root), UMIM_CACHE_DIR=str(shard_cache))
    cluster = LocalCluster(temp_dir, env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for suffix in ("head", "worker"):
            (temp_dir.parent / f"{temp_dir.name}.{suffix}.log").unlink(missing_ok=True)


def _submit_run(cluster: LocalCluster, data_root: Path, cache: Path, out: Path,
                *overrides: str) -> tuple[str, object]:
    """``ray job submit --working-dir`` of ``umim run experiments/smoke.yaml`` (the workflow
    of docs/cluster.md); returns the job's output and its final info, failing the test
    unless it succeeded."""
    from ray.job_submission import JobSubmissionClient

    umim = VENV_BIN / "umim"
    entrypoint = [str(umim)] if umim.exists() else [sys.executable, "-m", "engine.cli"]
    runtime_env = {
        # .gitignore'd paths (.venv/, runs/, ...) are never uploaded; these neither.
        "excludes": [".git", ".venv", "runs", "**/__pycache__", "**/.pytest_cache"],
        "env_vars": {"UMIM_CACHE_DIR": str(cache)},
    }
    submission_id = f"umim-test-{os.getpid()}-{time.time_ns()}"
    cmd = [str(RAY_CLI), "job", "submit", "--address", cluster.dashboard_url,
           "--submission-id", submission_id, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           *entrypoint, "run", "experiments/smoke.yaml", *overrides, "--out", str(out),
           "--quiet", "--data-root", str(data_root)]
    try:
        job = subprocess.run(cmd, env=cluster.env, cwd=REPO, capture_output=True,
                             text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"`ray job submit` still running after {JOB_TIMEOUT_S:g}s:\n"
                    f"{(err.stdout or b'')[-4000:]!r}")
    output = job.stdout + job.stderr
    assert job.returncode == 0, (
        f"`ray job submit` exited with {job.returncode}:\n{output[-6000:]}")
    status = JobSubmissionClient(cluster.dashboard_url).get_job_info(submission_id)
    assert status.status == "SUCCEEDED", (status.status, status.message)
    return output, status


@pytest.mark.integration
def test_job_submit_spreads_clients_over_two_nodes(local_cluster: LocalCluster,
                                                   data_root: Path, shard_cache: Path,
                                                   tmp_path: Path) -> None:
    from ray.util.state import list_actors, list_nodes

    out = tmp_path / "run"
    output, status = _submit_run(local_cluster, data_root, shard_cache, out)

    # The run wrote its directory, with a test AUC for both domains.
    for name in ("config.yaml", "history.parquet", "summary.json"):
        assert (out / name).is_file(), f"{name} missing; job output:\n{output[-4000:]}"
    assert any((out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["domains"]) == {"breast", "pathology"}
    for domain, row in summary["domains"].items():
        assert 0.0 <= row["auc"] <= 1.0, (domain, row)
    assert 0.0 <= summary["mean_test_auc"] <= 1.0

    # Two nodes of 1 CPU each and two 1-CPU client actors: one actor on each node.
    nodes = [n for n in list_nodes(address=local_cluster.dashboard_url, detail=True)
             if n.state == "ALIVE"]
    assert len(nodes) == 2 and sum(bool(n.is_head_node) for n in nodes) == 1
    filters = [("class_name", "=", "ClientHost")]
    if status.job_id:
        filters.append(("job_id", "=", status.job_id))
    actors = list_actors(address=local_cluster.dashboard_url, filters=filters, detail=True,
                         raise_on_missing_output=False)
    assert len(actors) == 2, actors
    assert {a.node_id for a in actors} == {n.node_id for n in nodes}


@pytest.mark.integration
def test_a_train_job_spreads_its_workers_over_two_nodes(local_cluster: LocalCluster,
                                                        data_root: Path, tmp_path: Path
                                                        ) -> None:
    """MIM pretraining as a 2-worker DDP Ray Train job on two 1-CPU nodes: one worker on
    each node (gloo across the nodes), then the run goes on to its federated rounds."""
    from ray.util.state import list_actors, list_nodes

    out = tmp_path / "run"
    cache = tmp_path / "cache"  # no MIM base cached: the Train job must run
    _submit_run(local_cluster, data_root, cache, out,
                "pretrain.method=mim", "pretrain.epochs=1", "pretrain.batch_size=32",
                "pretrain.num_workers=2", "pretrain.cpus_per_worker=1", "data.pool_size=256",
                "strategy.rounds=1", "run.dashboard=true")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base"]["method"] == "mim" and summary["base"]["cached"] is False

    nodes = {n.node_id for n in list_nodes(address=local_cluster.dashboard_url, detail=True)
             if n.state == "ALIVE"}
    filters = [("class_name", "=", "RayTrainWorker")]
    workers = list_actors(address=local_cluster.dashboard_url, filters=filters, detail=True,
                          raise_on_missing_output=False)
    assert len(workers) == 2, workers
    assert {w.node_id for w in workers} == nodes  # one DDP worker on each of the two nodes
