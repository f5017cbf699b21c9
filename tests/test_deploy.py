"""FedPT on Flower's deployment engine, for real: processes on 127.0.0.1, as docs/deployment.md runs them.

A SuperLink with TLS (certificates from ``fedpt deploy certs``) and SuperNode authentication
(keys registered with ``flwr supernode register``); SuperNodes that each train on their own
JSONL file (``--node-config data-path=...``); ``flwr run`` over TLS. Also ``flwr run .`` as a
user types it (Flower starts its own local SuperLink). Ports are picked free at run time; every
process started here is stopped by PID and process group (``fedpt.deploy.stop_process_tree``),
also when a test fails. Select with ``-m deploy``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedpt.cli import main
from fedpt.deploy import listening_pid, stop_local_superlink, stop_process_tree

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr of this environment
# Flower starts its own helpers (flower-superexec, flower-superlink) by name: as in an activated venv,
# this environment's bin comes first (CI calls .venv/bin/python without activating).
ON_PATH = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
FAST = ("data.eval_size=8; data.kd_pool_size=8; eval.max_new_tokens=8; distill.max_new_tokens=8; "
        "train.steps=2; distill.steps=2")
TWO_DEVICES = "federation.num_clients=2; federation.clients_per_round=2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """Processes started by a test, each in its own session; ``stop_all`` stops them and what they started."""

    logs: Path
    env: dict[str, str]
    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.logs, start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 120.0) -> None:
        """Until ``text`` appears in the process's log (it is an error for the process to exit first)."""
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            assert self.started[name].poll() is None, f"{name} exited:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name}: no {text!r} after {timeout} s:\n{self.log(name)[-3000:]}"
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        stop_process_tree(self.started[name].pid)
        self.started[name].wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of this user's live processes whose environment has ``name=value`` (children inherit it)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(name) == value:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            pass
    return found


def flwr(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@dataclass
class Deployment:
    dir: Path
    address: str
    procs: Processes
    node_ids: dict[str, int]  # key name -> node id given at registration

    def start_node(self, name: str, key: str, data: Path, partition: int, *extra: str) -> subprocess.Popen:
        return self.procs.start(
            name, "flower-supernode", "--superlink", self.address, *extra,
            "--auth-supernode-private-key", str(self.dir / "certs" / f"{key}.key"), "--port", str(free_port()),
            "--node-config", f'data-path="{data}" partition-id={partition}')

    def run(self, out: Path, settings: str, systems: str = "fedpt") -> tuple[subprocess.CompletedProcess, list]:
        result = flwr(self.procs.env, "run", ".", "fedpt", "--stream", "--run-config",
                      f'out="{out}" systems="{systems}" node-timeout=120 set="{settings}"')
        rounds = out / "rounds.jsonl"
        rows = [json.loads(line) for line in rounds.read_text().splitlines()] if rounds.is_file() else []
        return result, rows


def _device_files(folder: Path) -> list[Path]:
    """Two devices' private files: disjoint records of the tiny preset's device split, plus a broken one."""
    from fedpt.config import load_config
    from fedpt.server import load_splits

    train = load_splits(load_config(preset="tiny")).train
    files = []
    for i in range(2):
        path = folder / f"device-{i}.jsonl"
        path.write_text("".join(json.dumps({"instruction": ex.instruction, "context": ex.context,
                                            "response": ex.response, "category": ex.category}) + "\n"
                                for ex in train[i::2][:40]))
        files.append(path)
    bad = folder / "device-bad.jsonl"
    lines = files[0].read_text().splitlines()
    lines[4] = '{"instruction": "cut off here'  # line 5
    bad.write_text("\n".join(lines) + "\n")
    return [*files, bad]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, fedpt_home):
    """SuperLink (TLS + SuperNode auth) and SuperNodes a and b (registered, each with its own file)."""
    folder = tmp_path_factory.mktemp("deploy")
    assert main(["deploy", "certs", str(folder / "certs"), "--nodes", "4"]) == 0  # node-4 is never registered
    port = free_port()
    address = f"127.0.0.1:{port}"
    home = folder / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedpt"\n\n[superlink.fedpt]\naddress = "{address}"\n'
        f'root-certificates = "{folder / "certs" / "ca.crt"}"\n\n'
        f'[superlink.no-ca]\naddress = "{address}"\n')
    env = {**os.environ, "PATH": ON_PATH, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    procs = Processes(folder, env)
    try:
        certs = folder / "certs"
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                    "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                    "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                    "--host", "127.0.0.1", "--port", str(port))
        procs.wait_for("superlink", "Uvicorn running")
        node_ids = {}
        for key in ("node-1", "node-2", "node-3"):
            done = flwr(env, "supernode", "register", str(certs / f"{key}.pub"), "fedpt", "--format", "json")
            assert done.returncode == 0, done.stdout + done.stderr
            node_ids[key] = json.loads(done.stdout[done.stdout.index("{"):])["node-id"]
        link = Deployment(folder, address, procs, node_ids)
        good_a, good_b, _ = _device_files(folder)
        ca = ("--root-certificates", str(certs / "ca.crt"))
        link.start_node("a", "node-1", good_a, 0, *ca)
        link.start_node("b", "node-2", good_b, 1, *ca)
        yield link
    finally:
        procs.stop_all()


def test_two_authenticated_supernodes_over_tls_train_fedpt(deployment):
    """Test 1: flwr run of 2 FedPT rounds; both devices trained on their own files in every round."""
    start = time.perf_counter()
    out = deployment.dir / "out-tls"
    result, rows = deployment.run(out, f"{TWO_DEVICES}; {FAST}")
    wall = time.perf_counter() - start
    assert [(r["system"], r["round"]) for r in rows] == [("fedpt", 0), ("fedpt", 1), ("fedpt", 2)], \
        result.stdout[-3000:] + result.stderr[-2000:]
    ids = deployment.node_ids
    expected = sorted([(ids["node-1"], 0), (ids["node-2"], 1)])  # (node id, partition-id from --node-config)
    for row in rows[1:]:
        assert row["clients"] == 2 and row["failures"] == 0 and row["train_loss"] > 0
        assert list(zip(row["nodes"], row["partitions"])) == expected
        assert row["kd_kl_before"] is not None  # FedPT's server steps ran
    from safetensors.torch import load_file

    adapter = load_file(out / "fedpt" / "adapter" / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.isfinite().all() for t in adapter.values())
    assert max(float(t.abs().max()) for t in lora_b) > 0  # trained: LoRA B starts at zero
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["fedpt"]["final"]["round"] == 2
    print(f"\nTLS deployment test: flwr run of 2 FedPT rounds took {wall:.1f} s wall")


def test_a_device_with_a_malformed_file_fails_alone(deployment):
    """Test 3: the device's failure names its file and line; the round goes on with the other devices."""
    bad = deployment.dir / "device-bad.jsonl"
    # A third device joins a and b (stopping one instead would cost the ~60 s the SuperLink takes
    # to drop a silent node from its list).
    deployment.start_node("c", "node-3", bad, 2, "--root-certificates", str(deployment.dir / "certs" / "ca.crt"))
    out = deployment.dir / "out-bad"
    result, rows = deployment.run(out, "federation.num_clients=3; federation.clients_per_round=3; "
                                       f"federation.min_results=2; federation.rounds=1; {FAST}", systems="fedavg-small")
    assert [r["round"] for r in rows] == [0, 1], result.stdout[-3000:] + result.stderr[-2000:]
    last = rows[-1]
    ids = deployment.node_ids
    assert last["clients"] == 2 and last["failures"] == 1
    assert sorted(last["nodes"]) == sorted([ids["node-1"], ids["node-2"]])
    [problem] = last["problems"]
    assert problem.startswith(f"node {ids['node-3']}: error: FedPTError: {bad}:5: not valid JSON"), problem


def test_unregistered_supernode_and_client_without_the_ca_are_refused(deployment):
    """Test 2: an unregistered key is refused; neither a SuperNode nor flwr connects without the CA."""
    certs = deployment.dir / "certs"
    data = deployment.dir / "device-0.jsonl"
    intruder = deployment.start_node("intruder", "node-4", data, 9, "--root-certificates", str(certs / "ca.crt"),
                                     "--max-retries", "0")
    assert intruder.wait(timeout=180) != 0
    log = deployment.procs.log("intruder")
    assert "Failed to initialize the connection to the SuperLink" in log and "Failed to activate SuperNode" in log, \
        log[-2000:]
    no_ca = deployment.start_node("no-ca-node", "node-1", data, 0, "--max-retries", "0")
    assert no_ca.wait(timeout=180) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.procs.log("no-ca-node"), deployment.procs.log("no-ca-node")[-2000:]
    # flwr with a connection that lacks `root-certificates` fails; the same SuperLink with the CA answers.
    refused = flwr(deployment.procs.env, "supernode", "ls", "no-ca", "--format", "json")
    refused = json.loads(refused.stdout[refused.stdout.index("{"):])
    assert refused["success"] is False and "unavailable" in refused["error-message"], refused
    listed = flwr(deployment.procs.env, "supernode", "ls", "fedpt", "--format", "json")
    listed = json.loads(listed.stdout[listed.stdout.index("{"):])
    assert listed["success"] is True, listed
    registered = {int(n["node-id"]) for n in listed["nodes"]}
    assert registered == set(deployment.node_ids.values())  # the intruder's key never got a node id


def test_flwr_run_dot_as_a_user_types_it(tmp_path, fedpt_home):
    """Test 4: `flwr run .` in the project directory; Flower starts its local SuperLink; then stopped."""
    port = free_port()
    env = {**os.environ, "PATH": ON_PATH, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           # free ports instead of Flower's fixed 39091/39093 (other runs share this host)
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           # the switch README asks for: Flower would otherwise `uv sync` the app's dependencies per run
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    out = tmp_path / "out"
    try:
        args = ("run", ".", "--stream", "--run-config", f'out="{out}" set="{TWO_DEVICES}; {FAST}"')
        result = flwr(env, *args)
        if "Failed to start local SuperLink within" in result.stdout + result.stderr:
            # Flower's CLI gives the SuperLink it starts a fixed 15 s (LOCAL_SUPERLINK_STARTUP_TIMEOUT);
            # on this shared 2-core host under load, importing flwr.superlink alone took 20 s. The same
            # CLI again with only that constant raised (Flower has already killed its first SuperLink).
            print("\nflwr run .: Flower's 15 s local SuperLink start-up timeout hit; retrying with 300 s")
            result = subprocess.run(
                [sys.executable, "-c", "import sys, flwr.cli.local_superlink as m; m.LOCAL_SUPERLINK_STARTUP_TIMEOUT = "
                 "300.0; from flwr.cli.app import app; sys.argv[0] = 'flwr'; sys.exit(app())", *args],
                capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()] \
            if (out / "rounds.jsonl").is_file() else []
        assert [r["round"] for r in rows] == [0, 1, 2], result.stdout[-3000:] + result.stderr[-2000:]
        assert all(r["clients"] == 2 and sorted(r["partitions"]) == [0, 1] for r in rows[1:])  # listed in node-id order
        assert not list((tmp_path / "flwr-home").glob("runtime-envs/*/lib"))  # nothing was installed
        # The preset's 3 devices against the local simulation's 2 SuperNodes: one line, not an endless wait.
        result = flwr(env, "run", ".", "--stream", "--run-config",
                      f'out="{tmp_path / "out3"}" node-timeout=3 set="{FAST}"')
        assert ("error: the federation has 2 connected SuperNode(s) after 3 s, but federation.num_clients = 3"
                in result.stdout + result.stderr), result.stdout[-3000:]
        assert not (tmp_path / "out3" / "rounds.jsonl").exists()
    finally:
        superlink = listening_pid(port)
        stopped = stop_local_superlink(port) if superlink else []
    assert superlink in stopped and listening_pid(port) is None
    # Nothing that `flwr run .` started is left: no process carries this test's FLWR_HOME any more.
    assert processes_with_env("FLWR_HOME", env["FLWR_HOME"]) == []
