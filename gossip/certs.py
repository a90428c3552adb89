"""``gossip-certs``: the cluster's certificate authority, node and client certificates.

Peer links use mutual TLS (``gossip.net.tls``). Who a peer *is* comes from its
certificate, not from what it says in its ``Hello``: a node certificate carries
the node's id as the subjectAltName URI ``urn:gossip:node:N``, signed by the
cluster CA, and a node refuses a peer whose certificate names another id. Host
names given with ``--host`` become DNS (or IP) subjectAltNames, for tools that
check them; nodes check the id, which stays right when a node moves.

One directory holds a cluster's files (the defaults of ``cluster.tls_*``
expect it to be ``tls/`` beside the cluster file)::

    ca.key, ca.crt          the CA that signs new certificates (key 0600)
    ca-bundle.crt           the CAs a node trusts: one, or old + new during a rotation
    node-N.key, node-N.crt  node N's key and certificate
    client-NAME.key/.crt    a client certificate (``urn:gossip:client:NAME``)
    retired/                CAs replaced by ``rotate`` (kept until deleted by hand)

Rotation (Serf's keyring is the model): ``rotate`` makes a new CA and trusts
both (``ca-bundle.crt`` holds new and old); once every node has the new bundle,
re-``issue`` and roll out node certificates from the new CA; then ``retire``
leaves only the new CA in the bundle. Each step is a rolling restart, one node
at a time, so the cluster never stops.

Keys are ECDSA P-256 (cheap handshakes), written with mode 0600; every file is
written to a temporary name and renamed, so a crash never leaves half a key.
Every error is one line on stderr (exit status 1; 2 for a usage mistake).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gossip.argtypes import OneLineParser, whole
from gossip.settings import MAX_NODE_ID

PROGRAM = "gossip-certs"
NODE_URI_PREFIX = "urn:gossip:node:"
CLIENT_URI_PREFIX = "urn:gossip:client:"
CA_KEY, CA_CERT, CA_BUNDLE = "ca.key", "ca.crt", "ca-bundle.crt"
RETIRED = "retired"
CA_DAYS = 3650
LEAF_DAYS = 825
# Certificates start this long before "now", so that a neighbour whose clock is a
# little behind does not see a fresh certificate as not yet valid.
BACKDATE = datetime.timedelta(minutes=5)
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

PrivateKey = ec.EllipticCurvePrivateKey


class CertError(Exception):
    """A certificate operation cannot be done; ``str()`` is one line for the operator."""


# -- identities -----------------------------------------------------------------


def node_uri(node_id: int) -> str:
    return f"{NODE_URI_PREFIX}{node_id}"


def uris_of(cert: x509.Certificate) -> list[str]:
    """The subjectAltName URIs of ``cert`` (none when it has no such extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def node_id_of(cert: x509.Certificate) -> int | None:
    """The node id a certificate is bound to, or None if it names no node (or several)."""
    ids = []
    for uri in uris_of(cert):
        if uri.startswith(NODE_URI_PREFIX):
            text = uri[len(NODE_URI_PREFIX) :]
            if not (text.isascii() and text.isdigit()) or len(text) > 10:
                return None
            ids.append(int(text))
    if len(ids) != 1 or not 0 <= ids[0] <= MAX_NODE_ID:
        return None
    return ids[0]


def describe(cert: x509.Certificate) -> str:
    """Subject, identities and validity in one line (``show``, and log lines)."""
    try:
        subject = cert.subject.rfc4514_string()
    except ValueError:
        subject = "?"
    names = uris_of(cert)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
        names += [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return (
        f"{subject}; names: {', '.join(names) or 'none'};"
        f" issuer: {cert.issuer.rfc4514_string()};"
        f" valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to"
        f" {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


# -- reading and writing ---------------------------------------------------------


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate of a PEM file (a bundle holds several)."""
    data = _read(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertError(f"{os.fspath(path)}: no PEM certificate in it")
    return certs


def load_key(path: str | os.PathLike[str]) -> PrivateKey:
    data = _read(path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CertError(f"{os.fspath(path)}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{os.fspath(path)}: not an EC private key")
    return key


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertError(f"{os.fspath(path)}: cannot read the {what}: {e.strerror or e}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``, atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits off
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise CertError(f"{path}: cannot write: {e.strerror or e}") from None


def write_key(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)


def write_certs(path: Path, certs: Sequence[x509.Certificate]) -> None:
    _write(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644)


# -- making certificates -----------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    name: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: PrivateKey | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed cluster CA. Its subject names the time it was made, so that the
    old and the new CA of a rotation never share a name."""
    key = key or new_key()
    start = not_before or _now() - BACKDATE
    end = not_after or start + datetime.timedelta(days=CA_DAYS)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gossip"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"gossip cluster CA {name} {_now():%Y%m%dT%H%M%S.%f}"[:64]
            ),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    uri: str,
    hosts: Sequence[str] = (),
    client_only: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: PrivateKey | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A leaf certificate for ``uri`` signed by the CA. A node's certificate serves both
    ends of a link (server and client auth); a client's only dials."""
    key = key or new_key()
    start = not_before or _now() - BACKDATE
    end = not_after or start + datetime.timedelta(days=LEAF_DAYS)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not client_only:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gossip"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


# -- the directory -------------------------------------------------------------------


class CertDir:
    """A cluster's certificate directory (layout in the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def bundle(self) -> Path:
        return self.path / CA_BUNDLE

    def init_ca(self, name: str, days: int) -> Path:
        if (self.path / CA_KEY).exists() or (self.path / CA_CERT).exists():
            raise CertError(
                f"{self.path}: a CA is already there ({CA_KEY}); use 'rotate' to replace it"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CertError(f"{self.path}: cannot make the directory: {e.strerror or e}") from None
        start = _now() - BACKDATE
        key, cert = make_ca(name, not_before=start, not_after=start + datetime.timedelta(days))
        write_key(self.path / CA_KEY, key)
        write_certs(self.path / CA_CERT, [cert])
        write_certs(self.bundle, [cert])
        return self.path / CA_CERT

    def ca(self) -> tuple[PrivateKey, x509.Certificate]:
        if not (self.path / CA_KEY).exists():
            raise CertError(f"{self.path}: no CA here ({CA_KEY}); run 'init-ca {self.path}' first")
        key = load_key(self.path / CA_KEY)
        cert = load_certificates(self.path / CA_CERT)[0]
        if cert.public_key() != key.public_key():
            raise CertError(f"{self.path}: {CA_CERT} does not belong to {CA_KEY}")
        return key, cert

    def issue_node(self, node_id: int, hosts: Sequence[str], days: int) -> Path:
        ca_key, ca_cert = self.ca()
        start = _now() - BACKDATE
        key, cert = issue(
            ca_key,
            ca_cert,
            common_name=f"gossip node {node_id}",
            uri=node_uri(node_id),
            hosts=hosts,
            not_before=start,
            not_after=min(start + datetime.timedelta(days), ca_cert.not_valid_after_utc),
        )
        write_key(self.path / f"node-{node_id}.key", key)
        write_certs(self.path / f"node-{node_id}.crt", [cert])
        return self.path / f"node-{node_id}.crt"

    def issue_client(self, name: str, days: int) -> Path:
        ca_key, ca_cert = self.ca()
        start = _now() - BACKDATE
        key, cert = issue(
            ca_key,
            ca_cert,
            common_name=f"gossip client {name}",
            uri=f"{CLIENT_URI_PREFIX}{name}",
            client_only=True,
            not_before=start,
            not_after=min(start + datetime.timedelta(days), ca_cert.not_valid_after_utc),
        )
        write_key(self.path / f"client-{name}.key", key)
        write_certs(self.path / f"client-{name}.crt", [cert])
        return self.path / f"client-{name}.crt"

    def trusted(self) -> list[x509.Certificate]:
        return load_certificates(self.bundle) if self.bundle.exists() else []

    def rotate(self, name: str, days: int) -> Path:
        """A new signing CA; the bundle trusts it and every CA it trusted before."""
        old_key, old_cert = self.ca()
        retired = self.path / RETIRED
        try:
            retired.mkdir(exist_ok=True)
        except OSError as e:
            raise CertError(f"{retired}: cannot make the directory: {e.strerror or e}") from None
        stamp = f"ca-{old_cert.serial_number:x}"[:19]
        write_key(retired / f"{stamp}.key", old_key)
        write_certs(retired / f"{stamp}.crt", [old_cert])
        start = _now() - BACKDATE
        key, cert = make_ca(name, not_before=start, not_after=start + datetime.timedelta(days))
        bundle = [cert] + [c for c in self.trusted() if c != cert]
        if old_cert not in bundle:
            bundle.append(old_cert)
        write_certs(self.bundle, bundle)
        write_key(self.path / CA_KEY, key)
        write_certs(self.path / CA_CERT, [cert])
        return self.bundle

    def retire(self) -> int:
        """Trust only the current CA; returns how many CAs left the bundle."""
        _, cert = self.ca()
        before = self.trusted()
        write_certs(self.bundle, [cert])
        return sum(1 for c in before if c != cert)


# -- the command -------------------------------------------------------------------------


def _node_id(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= MAX_NODE_ID):
        raise argparse.ArgumentTypeError(f"not a node id (0..{MAX_NODE_ID}): {text!r}")
    return int(text)


def _client_name(text: str) -> str:
    if not _CLIENT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a client name (letters, digits, '.', '_', '-'; up to 64)"
        )
    return text


def _host(text: str) -> str:
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    name = text.replace("{id}", "0")
    if len(name) > 253 or not re.fullmatch(rf"(\*\.)?{label}(\.{label})*\.?", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or an IP address")
    return text


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROGRAM,
        description="Make the cluster CA and the node and client certificates that peer"
        " links (and clients) authenticate with.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    days = whole(low=1, high=36500)

    c = sub.add_parser("init-ca", help="make a cluster CA in DIR (ca.key, ca.crt, ca-bundle.crt)")
    c.add_argument("dir", type=Path, metavar="DIR")
    c.add_argument("--name", default="gossip", help="cluster name shown in the CA's subject")
    c.add_argument(
        "--days", default=CA_DAYS, type=days, metavar="DAYS", help=f"validity (default {CA_DAYS})"
    )

    i = sub.add_parser("issue", help="make node N's key and certificate (node-N.key/.crt)")
    i.add_argument("dir", type=Path, metavar="DIR")
    i.add_argument("--node", type=_node_id, required=True, action="append", metavar="N")
    i.add_argument(
        "--host",
        type=_host,
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address the node is reached at (repeatable; {id} is replaced)",
    )
    i.add_argument(
        "--days",
        default=LEAF_DAYS,
        type=days,
        metavar="DAYS",
        help=f"validity (default {LEAF_DAYS})",
    )

    k = sub.add_parser("client", help="make a client certificate (client-NAME.key/.crt)")
    k.add_argument("dir", type=Path, metavar="DIR")
    k.add_argument("--name", type=_client_name, required=True)
    k.add_argument(
        "--days",
        default=LEAF_DAYS,
        type=days,
        metavar="DAYS",
        help=f"validity (default {LEAF_DAYS})",
    )

    r = sub.add_parser(
        "rotate", help="make a new signing CA; trust old and new (ca-bundle.crt) until 'retire'"
    )
    r.add_argument("dir", type=Path, metavar="DIR")
    r.add_argument("--name", default="gossip", help="cluster name shown in the CA's subject")
    r.add_argument(
        "--days", default=CA_DAYS, type=days, metavar="DAYS", help=f"validity (default {CA_DAYS})"
    )

    t = sub.add_parser("retire", help="end a rotation: trust only the current CA")
    t.add_argument("dir", type=Path, metavar="DIR")

    s = sub.add_parser("show", help="print each certificate of a file in one line")
    s.add_argument("file", type=Path, metavar="FILE")
    return p


def _hosts_for(node_id: int, hosts: Sequence[str]) -> list[str]:
    return [h.replace("{id}", str(node_id)) for h in hosts]


def run(args: argparse.Namespace) -> list[str]:
    """Carry out one command; the lines to print."""
    if args.command == "show":
        out = []
        for cert in load_certificates(args.file):
            node = node_id_of(cert)
            who = f"node {node}: " if node is not None else ""
            out.append(who + describe(cert))
        return out
    certs = CertDir(args.dir)
    if args.command == "init-ca":
        return [f"wrote {certs.init_ca(args.name, args.days)} and {certs.bundle}"]
    if args.command == "issue":
        return [
            f"wrote {certs.issue_node(n, _hosts_for(n, args.host), args.days)}"
            for n in dict.fromkeys(args.node)
        ]
    if args.command == "client":
        return [f"wrote {certs.issue_client(args.name, args.days)}"]
    if args.command == "rotate":
        bundle = certs.rotate(args.name, args.days)
        return [
            f"new CA in {args.dir / CA_CERT}; {bundle} trusts {len(certs.trusted())} CAs."
            " Next: copy the bundle to every node and restart them one at a time, then"
            " 'issue' new node certificates and roll them out, then 'retire'."
        ]
    assert args.command == "retire"
    gone = certs.retire()
    return [f"{certs.bundle} now trusts only {args.dir / CA_CERT} ({gone} CAs removed)"]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        lines = run(args)
    except CertError as e:
        print(f"{PROGRAM}: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
