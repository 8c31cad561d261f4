"""The operator's Ray backend through Ray Client, the way deploy/ray/operator connects it.

On Kubernetes the operator is not a Ray node, so it cannot join by the GCS address (Ray looks
for a raylet of the cluster beside the driver); it connects to the head's Ray Client port
(``ray://ray-head.aifactory-ray.svc:10001``) and its driver runs on the head. Here a real Ray
head is started with the flags of ``deploy/ray/head.yaml`` (free ports instead of the fixed
ones, and, so it can run a gang alone, 2 GPUs, 2 CPUs and a worker's node-name label), and
``RayBackend`` in a process of its own must list that node by its ``aifactory.io/node`` label
and run a 2-worker gang to Succeeded through ``ray://``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from aifactory.controller.backends.ray.gang import NODE_NAME_LABEL
from tests.integration.k8s_env import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

RAY_BIN = Path(sys.executable).parent / "ray"
HEAD_YAML = REPO_ROOT / "deploy" / "ray" / "head.yaml"
NODE = "gpu-node-1"
START_TIMEOUT_SECONDS = 180.0


def head_args() -> list[str]:
    """``ray start`` arguments of the head in deploy/ray/head.yaml, for this machine."""
    (deployment,) = (d for d in yaml.safe_load_all(HEAD_YAML.read_text())
                     if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["ray"]
    client_port = free_port()
    replace = {"--port": str(free_port()), "--ray-client-server-port": str(client_port),
               "--dashboard-agent-listen-port": str(free_port()), "--num-cpus": "2",
               "--num-gpus": "2", "--node-ip-address": "127.0.0.1"}
    args = []
    for arg in container["args"]:
        key = arg.split("=", 1)[0]
        args.append(f"{key}={replace.pop(key)}" if key in replace else arg)
    assert not replace, f"head.yaml lacks {sorted(replace)}"
    extra_ports = ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    args += [f"{flag}={free_port()}" for flag in extra_ports]
    return [*args, f"--labels={NODE_NAME_LABEL}={NODE}"]


def client_port(args: list[str]) -> int:
    (port,) = (a.split("=", 1)[1] for a in args if a.startswith("--ray-client-server-port="))
    return int(port)


def wait_port(port: int, head: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start --head exited with {head.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Ray Client port {port} did not open in {timeout:g} s")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the head's process group (ray start --block stops what it started), then
    SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    pytest.importorskip("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO_ROOT)}  # the workers import tests.integration.ray_programs
    args = head_args()
    # A short --temp-dir: Ray's socket paths under pytest's tmp_path would pass 107 bytes.
    temp_dir = Path("/tmp") / f"aifactory-rc-{os.getpid()}"
    log = (tmp_path / "head.log").open("wb")
    head = subprocess.Popen([str(RAY_BIN), *args, f"--temp-dir={temp_dir}"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(client_port(args), head, START_TIMEOUT_SECONDS)
        yield f"ray://127.0.0.1:{client_port(args)}", env
    finally:
        stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_ray_backend_runs_a_gang_through_ray_client(
        ray_head: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    address, env = ray_head
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.ray_client_driver", address,
         str(tmp_path / "checkpoints")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    seen = json.loads(lines[-1])
    assert seen == {"nodes": [[NODE, 2]], "phase": "Succeeded"}, result.stderr[-3000:]
    reports = sorted((tmp_path / "checkpoints" / "it" / "through-client").glob("where-0-*.json"))
    assert [p.name for p in reports] == ["where-0-0.json", "where-0-1.json"]
