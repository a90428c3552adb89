"""Deployment files: Kubernetes manifests, the compose cluster, the systemd unit, and
the container health check. (The image and the compose cluster run for real in
scripts/container-test; Kubernetes cannot run here, so its manifests are checked
against the Kubernetes schemas.)"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor, threads
from twisted.protocols import amp

from gossip.client.commands import Status
from gossip.config import parse_config
from gossip.tap import Options

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GENERATE = DEPLOY / "generate.py"
UNIT = DEPLOY / "systemd" / "gossip@.service"
HEALTHCHECK = DEPLOY / "container" / "healthcheck.py"
BIN = Path(sys.executable).parent
UNIT_EXEC = "/opt/gossip/bin/gossip-node"  # where the README installs it
# An older Kubernetes release (the manifests use nothing newer) and the newest one
# kubernetes-validate knows.
K8S_VERSIONS = ("1.31", None)


def generate(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args], capture_output=True, text=True, cwd=cwd
    )


def load_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's resources by kind; each kind appears once."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"a kind appears twice: {kinds}"
    return {d["kind"]: d for d in docs}


def validate(resource: dict[str, Any]) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        kubernetes_validate.validate(
            resource, version or kubernetes_validate.utils.latest_version(), strict=True
        )


def endpoint_host(description: str) -> str:
    """``host=`` of a client endpoint description such as ``tcp:host=h:port=1``."""
    m = re.search(r"(?:^|:)host=([^:]+)", description)
    assert m, f"no host= in {description!r}"
    return m.group(1)


def endpoint_port(description: str) -> int:
    """The port of a client (``port=P``) or server (``tcp:P``) endpoint description."""
    m = re.search(r"(?:^tcp6?:|:port=)(\d+)", description)
    assert m, f"no port in {description!r}"
    return int(m.group(1))


def node_addresses(toml_text: str) -> dict[int, dict[str, str]]:
    """Per node id: the four addresses (contract of issue 8), whether the file gives
    them as endpoint descriptions or as the host/peer_port/client_port shorthand."""
    out = {}
    for node in tomllib.loads(toml_text)["node"]:
        host = node.get("host")
        out[node["id"]] = {
            "peer_address": node.get("peer_address") or f"tcp:host={host}:port={node['peer_port']}",
            "client_address": node.get("client_address")
            or f"tcp:host={host}:port={node['client_port']}",
            "peer_listen": node.get("peer_listen") or f"tcp:{node['peer_port']}:interface={host}",
            "client_listen": node.get("client_listen")
            or f"tcp:{node['client_port']}:interface={host}",
        }
    return out


# -- generated files -----------------------------------------------------------


def test_generated_deploy_files_are_current() -> None:
    """deploy/container/{cluster.toml,compose.yaml} and deploy/kubernetes/gossip.yaml are
    exactly what deploy/generate.py (through gossip-config) writes now."""
    r = generate("check")
    assert r.returncode == 0, r.stdout + r.stderr


# -- Kubernetes ----------------------------------------------------------------


def check_kubernetes(path: Path, nodes: int, namespace: str) -> None:
    """The manifest is valid for the schemas, its parts refer to each other, and its
    cluster file is a valid cluster of ``nodes`` whose addresses are the pods' names."""
    res = load_manifest(path)
    assert set(res) == {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"}
    for resource in res.values():
        validate(resource)
        assert resource["metadata"]["namespace"] == namespace

    sts, svc, cm, pdb = (
        res[k] for k in ("StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget")
    )
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    labels = spec["template"]["metadata"]["labels"]
    # The headless service names every pod, ready or not (nodes dial while starting).
    assert spec["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    for selector in (svc["spec"]["selector"], spec["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    # A volume per pod, mounted where the command keeps the log; the cluster file.
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    (cm_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert cm_volume["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts[cm_volume["name"]] == "/etc/gossip"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GOSSIP_CONFIG"] == "/etc/gossip/cluster.toml"
    # Not root, no way to become root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe in container
        if "tcpSocket" in container[probe]:
            assert container[probe]["tcpSocket"]["port"] in ports

    text = cm["data"]["cluster.toml"]
    config = parse_config(text, "ConfigMap gossip-cluster")  # gossip's own validation
    assert sorted(config.nodes) == list(range(1, spec["replicas"] + 1))
    assert spec["replicas"] == nodes
    addresses = node_addresses(text)
    pod_dns = (
        f"{sts['metadata']['name']}-{{}}.{svc['metadata']['name']}.{namespace}.svc.cluster.local"
    )
    for node_id, addr in addresses.items():
        assert endpoint_host(addr["peer_address"]) == pod_dns.format(node_id - 1)
        assert endpoint_host(addr["client_address"]) == pod_dns.format(node_id - 1)
        assert endpoint_port(addr["peer_address"]) == ports["peer"]
        assert endpoint_port(addr["client_address"]) == ports["client"]
        for listen in ("peer_listen", "client_listen"):
            assert "interface=0.0.0.0" in addr[listen]
        assert endpoint_port(addr["client_listen"]) == int(env["GOSSIP_CLIENT_PORT"])


def test_kubernetes_manifest_is_valid_and_consistent() -> None:
    """The committed 16-node manifest: schemas of Kubernetes 1.31 and the newest, strict
    (unknown fields are errors); its cluster file matches the StatefulSet."""
    check_kubernetes(DEPLOY / "kubernetes" / "gossip.yaml", 16, "default")


def test_kubernetes_manifest_for_another_size_and_namespace(tmp_path: Path) -> None:
    """``generate.py kubernetes --nodes 6 --namespace prod`` writes a manifest that is as
    valid, with 6 replicas and the prod namespace in every address."""
    out = tmp_path / "gossip-6.yaml"
    r = generate("kubernetes", "--nodes", "6", "--namespace", "prod", "-o", str(out))
    assert r.returncode == 0, r.stderr
    check_kubernetes(out, 6, "prod")


def test_schema_validation_rejects_mistakes() -> None:
    """The validation is not vacuous: a misspelled field and a wrongly typed value in the
    StatefulSet are each rejected."""
    import kubernetes_validate

    sts = load_manifest(DEPLOY / "kubernetes" / "gossip.yaml")["StatefulSet"]
    typo = {**sts, "spec": {**sts["spec"], "replica": 3}}
    wrong_type = {**sts, "spec": {**sts["spec"], "replicas": "sixteen"}}
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(bad)


def test_pod_command_derives_the_node_id_from_the_ordinal(tmp_path: Path) -> None:
    """Pod gossip-0 runs node 1 and gossip-15 node 16: the container's shell command, run
    by /bin/sh with a stand-in gossip-node that prints its arguments."""
    sts = load_manifest(DEPLOY / "kubernetes" / "gossip.yaml")["StatefulSet"]
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    stand_in = tmp_path / "gossip-node"
    stand_in.write_text('#!/bin/sh\necho "$@"\n')
    stand_in.chmod(0o755)
    for ordinal, node_id in ((0, 1), (15, 16)):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_NAME": f"gossip-{ordinal}"}
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["--id", str(node_id), "--data-dir", "/data"]


# -- compose -------------------------------------------------------------------


def test_compose_cluster_gives_each_node_its_service_name_and_volume() -> None:
    """compose.yaml has one service per node of cluster.toml, named as the file's hosts,
    each running its own id with its own named volume; the file is a valid cluster."""
    directory = DEPLOY / "container"
    compose = yaml.safe_load((directory / "compose.yaml").read_text())
    text = (directory / "cluster.toml").read_text()
    config = parse_config(text, "cluster.toml")
    addresses = node_addresses(text)
    services = compose["services"]
    assert len(services) == len(config.nodes) == 16
    volumes = set()
    for node_id, addr in addresses.items():
        name = endpoint_host(addr["peer_address"])
        assert endpoint_host(addr["client_address"]) == name
        assert "interface=0.0.0.0" in addr["client_listen"]  # the health check dials 127.0.0.1
        service = services[name]
        assert service["command"] == ["--id", str(node_id), "--data-dir", "/data"]
        assert "./cluster.toml:/etc/gossip/cluster.toml:ro" in service["volumes"]
        (data,) = [v for v in service["volumes"] if v.endswith(":/data")]
        volumes.add(data.split(":")[0])
    assert volumes == set(compose["volumes"]) and len(volumes) == 16


# -- systemd -------------------------------------------------------------------


def unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    section = ""
    out: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key), []).append(value)
    return out


def unit_for_this_machine(tmp_path: Path, text: str) -> Path:
    """A copy of the unit whose ExecStart runs the gossip-node of this test's virtualenv:
    systemd-analyze checks that the program exists. Exactly that path changes."""
    assert text.count(UNIT_EXEC) == 1
    path = tmp_path / "gossip@.service"
    path.write_text(text.replace(UNIT_EXEC, str(BIN / "gossip-node")))
    return tmp_path / "gossip@3.service"


def systemd_analyze_verify(unit: Path) -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    r = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, cwd=unit.parent
    )
    return (
        f"exit status {r.returncode}\n{r.stdout}{r.stderr}"
        if r.returncode or r.stdout or r.stderr
        else ""
    )


def test_systemd_unit_verifies_without_a_word(tmp_path: Path) -> None:
    """``systemd-analyze verify gossip@3.service`` prints nothing: it warns about unknown
    keys and misplaced settings with exit status 0, so any output fails."""
    assert systemd_analyze_verify(unit_for_this_machine(tmp_path, UNIT.read_text())) == ""


def test_systemd_verify_reports_a_misspelled_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelled key in a copy of the unit is reported."""
    text = UNIT.read_text().replace("Restart=on-failure", "Restart=on-failure\nRestrat=always")
    assert "Restrat" in systemd_analyze_verify(unit_for_this_machine(tmp_path, text))


def test_systemd_unit_restarts_hardened_with_a_state_directory() -> None:
    """What issue 8 asks of the unit: restart on failure, its own state directory as the
    data directory, and the sandbox settings."""
    s = unit_settings(UNIT.read_text())
    assert s[("Service", "Restart")] == ["on-failure"]
    assert s[("Service", "StateDirectory")] == ["gossip/%i"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ]:
        assert s[("Service", key)] == [value], key
    assert s[("Install", "WantedBy")] == ["multi-user.target"]


def test_systemd_exec_start_is_a_valid_gossip_node_command_line(tmp_path: Path) -> None:
    """The unit's ExecStart arguments, with %i = 3 and the state directory filled in, are
    accepted by gossip-node's option parser against a real cluster file."""
    (exec_start,) = unit_settings(UNIT.read_text())[("Service", "ExecStart")]
    program, *args = exec_start.split()
    assert program == UNIT_EXEC
    cluster = tmp_path / "cluster.toml"
    subprocess.run([str(BIN / "gossip-config"), "--nodes", "4", "-o", str(cluster)], check=True)
    filled = [
        a.replace("%i", "3")
        .replace("/etc/gossip/cluster.toml", str(cluster))
        .replace("${STATE_DIRECTORY}", str(tmp_path / "state"))
        for a in args
    ]
    options = Options()
    options.parseOptions(filled)
    assert options["id"] == 3
    assert options["data-dir"] == str(tmp_path / "state")


# -- the container health check --------------------------------------------------


def run_healthcheck(port: int) -> tuple[int, str, float]:
    env = {**os.environ, "GOSSIP_CLIENT_PORT": str(port), "GOSSIP_HEALTH_HOST": "127.0.0.1"}
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True, timeout=30
    )
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t


def _status_answer(**values: Any) -> dict[str, Any]:
    """Every field of the Status command's answer: ``values``, else an empty one."""
    empty = {amp.AmpList: [], amp.Integer: 0, amp.Float: 0.0, amp.Unicode: "", amp.Boolean: False}
    out = {}
    for name, argument in Status.response:
        key = name.decode()
        out[key] = values.get(key, empty[type(argument)])
    return out


class _StatusOnly(amp.AMP):
    @Status.responder
    def status(self) -> dict[str, Any]:
        return _status_answer(node_id=7, cluster="test", message_count=42)


@pytest_twisted.ensureDeferred
async def test_healthcheck_passes_when_the_node_answers_status() -> None:
    """Against Twisted's AMP answering Status (as a node does), the stdlib-only health
    check exits 0 and names the node and its message count."""
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory.forProtocol(_StatusOnly), interface="127.0.0.1")
    number = port.getHost().port
    try:
        code, out, _ = await threads.deferToThread(run_healthcheck, number)
    finally:
        await port.stopListening()
    assert code == 0, out
    assert out.strip() == f"node 7 at 127.0.0.1:{number} answers: 42 messages"


def test_healthcheck_fails_when_nothing_listens() -> None:
    """A refused connection: exit status 1 and one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        code, out, _ = run_healthcheck(port)
    assert code == 1
    assert out.startswith("unhealthy:") and len(out.strip().splitlines()) == 1


def test_healthcheck_fails_when_the_port_accepts_but_never_answers() -> None:
    """A stuck node (the kernel accepts the connection, nobody answers): exit status 1
    after the check's deadline, not later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        code, out, took = run_healthcheck(s.getsockname()[1])
    assert code == 1
    assert "no answer within 3 s" in out
    assert took < 10
