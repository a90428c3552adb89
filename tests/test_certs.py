"""``gossip-certs`` and the cluster file's TLS settings.

The command runs in a subprocess as users run it (one line per error, exit
status 1 or 2); what it writes is read back with ``cryptography``.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gossip import certs
from gossip.config import ConfigError, dump_config, load_config, parse_config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gossip.certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(certs.__file__).parent.parent)},
    )


def sans(path: Path) -> x509.SubjectAlternativeName:
    cert = certs.load_certificates(path)[0]
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_issue_and_client_write_keys_0600_and_bind_the_identity(tmp_path: Path) -> None:
    """init-ca makes a CA and a one-CA bundle; issue binds node 3 as the URI
    urn:gossip:node:3 with its host names as DNS / IP names (``{id}`` replaced) and both
    TLS usages; client binds urn:gossip:client:NAME for client auth only. Every key is
    mode 0600 whatever the umask, certificates 0644."""
    d = tmp_path / "tls"
    old = os.umask(0)
    try:
        assert run("init-ca", str(d), "--name", "prod").returncode == 0
        r = run(
            "issue",
            str(d),
            "--node",
            "3",
            "--host",
            "gossip-{id}.example.net",
            "--host",
            "10.0.0.3",
        )
        assert r.returncode == 0, r.stderr
        assert run("client", str(d), "--name", "alice").returncode == 0
    finally:
        os.umask(old)
    for key in ("ca.key", "node-3.key", "client-alice.key"):
        assert mode(d / key) == 0o600, key
    assert mode(d / "node-3.crt") == 0o644
    names = sans(d / "node-3.crt")
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:gossip:node:3"]
    assert names.get_values_for_type(x509.DNSName) == ["gossip-3.example.net"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.3")]
    node = certs.load_certificates(d / "node-3.crt")[0]
    ca = certs.load_certificates(d / "ca.crt")[0]
    node.verify_directly_issued_by(ca)
    assert certs.node_id_of(node) == 3
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client = certs.load_certificates(d / "client-alice.crt")[0]
    assert certs.uris_of(client) == ["urn:gossip:client:alice"]
    assert certs.node_id_of(client) is None
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert certs.load_certificates(d / "ca-bundle.crt") == [ca]
    shown = run("show", str(d / "node-3.crt"))
    assert shown.returncode == 0
    assert shown.stdout.startswith("node 3: CN=gossip node 3")


def test_rotate_trusts_old_and_new_until_retire(tmp_path: Path) -> None:
    """rotate makes a new signing CA with another name, keeps the old one under retired/,
    and the bundle trusts both; certificates issued after it come from the new CA;
    retire leaves only the new CA in the bundle."""
    d = tmp_path / "tls"
    assert run("init-ca", str(d)).returncode == 0
    old = certs.load_certificates(d / "ca.crt")[0]
    r = run("rotate", str(d))
    assert r.returncode == 0 and "trusts 2 CAs" in r.stdout, r
    new = certs.load_certificates(d / "ca.crt")[0]
    assert new.subject != old.subject
    assert certs.load_certificates(d / "ca-bundle.crt") == [new, old]
    assert len(list((d / "retired").glob("ca-*.key"))) == 1
    assert run("issue", str(d), "--node", "1").returncode == 0
    certs.load_certificates(d / "node-1.crt")[0].verify_directly_issued_by(new)
    r = run("retire", str(d))
    assert r.returncode == 0 and "1 CAs removed" in r.stdout
    assert certs.load_certificates(d / "ca-bundle.crt") == [new]


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (("issue", "{d}", "--node", "1"), 1, "no CA here (ca.key); run 'init-ca"),
        (("issue", "{d}", "--node", "-1"), 2, "not a node id"),
        (("issue", "{d}", "--node", "1", "--host", "bad host!"), 2, "is not a host name"),
        (("client", "{d}", "--name", "a/b"), 2, "is not a client name"),
        (("show", "{d}/nothing.crt"), 1, "cannot read the certificate"),
        (("retire", "{d}"), 1, "no CA here"),
        (("frobnicate",), 2, "invalid choice"),
    ],
)
def test_mistakes_are_one_line(
    tmp_path: Path, args: tuple[str, ...], status: int, text: str
) -> None:
    """Each mistake is one line on stderr, no traceback, exit 1 (cannot do it) or 2 (usage)."""
    r = run(*(a.replace("{d}", str(tmp_path / "tls")) for a in args))
    assert r.returncode == status, r
    assert r.stderr.count("\n") == 1 and text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_init_ca_refuses_to_replace_a_ca(tmp_path: Path) -> None:
    """A second init-ca on a directory keeps the existing CA (its key signs every node's
    certificate) and says to use rotate."""
    d = tmp_path / "tls"
    assert run("init-ca", str(d)).returncode == 0
    key = (d / "ca.key").read_bytes()
    r = run("init-ca", str(d))
    assert r.returncode == 1 and "use 'rotate'" in r.stderr
    assert (d / "ca.key").read_bytes() == key


# -- the cluster file -----------------------------------------------------------------

BASE = """
[cluster]
name = "c"
allow_any_degree = true
{cluster}
[[node]]
id = 1
host = "127.0.0.1"
peer_port = 29001
client_port = 29101
neighbours = [2]
{node}
[[node]]
id = 2
host = "127.0.0.1"
peer_port = 29002
client_port = 29102
neighbours = [1]
"""


def test_tls_paths_are_relative_to_the_cluster_file_and_per_node_overrides(
    tmp_path: Path,
) -> None:
    """tls is off by default; the default files are tls/ beside the cluster file with
    {id} replaced, wherever the node was started; a node's own tls_cert / tls_key win,
    and the settings survive dump_config."""
    assert parse_config(BASE.format(cluster="", node="")).tls is False
    path = tmp_path / "cluster.toml"
    path.write_text(
        BASE.format(
            cluster="tls = true",
            node='tls_cert = "/etc/gossip/me.crt"\ntls_key = "keys/me.key"',
        )
    )
    config = load_config(path)
    assert config.tls is True
    one, two = config.tls_files(1), config.tls_files(2)
    assert one.ca == two.ca == str(tmp_path / "tls/ca-bundle.crt")
    assert (one.cert, one.key) == ("/etc/gossip/me.crt", str(tmp_path / "keys/me.key"))
    assert (two.cert, two.key) == (
        str(tmp_path / "tls/node-2.crt"),
        str(tmp_path / "tls/node-2.key"),
    )
    again = tmp_path / "again.toml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


def test_tls_endpoint_with_cluster_tls_is_refused(tmp_path: Path) -> None:
    """With cluster.tls the node adds TLS itself: an ssl: peer endpoint would wrap twice,
    and is an error naming the field."""
    text = BASE.format(cluster="tls = true", node='peer_address = "ssl:host=127.0.0.1:port=29001"')
    with pytest.raises(ConfigError, match=r"node\[1\]\.peer_address: .* is a TLS endpoint"):
        parse_config(text)
    with pytest.raises(ConfigError, match=r"cluster\.tls: expected true or false"):
        parse_config(BASE.format(cluster='tls = "yes"', node=""))
