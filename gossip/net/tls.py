"""Mutual TLS for peer links: who may connect, and who a connected peer is.

With ``cluster.tls = true`` both ends of every peer connection present a
certificate signed by a CA of the cluster's bundle (``tls_ca``, several CAs
during a rotation) and verify the other's: the listening side requires one
(``requireCertificate``), the dialing side checks the one it is shown.
Certificates from another CA, expired or not yet valid ones, and peers that
do not speak TLS fail in the handshake, before a byte of ours is read as a
frame. Who the peer *is* comes from its certificate (the subjectAltName URI
``urn:gossip:node:N``, see ``gossip.certs``): the link table compares it with
the ``Hello`` (``peer_identity``), so a valid certificate of node A cannot
claim to be node B. Host names are not checked: the id is what the cluster
file trusts, and it stays right when a node moves to another address.

The TLS layer is Twisted's ``TLSMemoryBIOProtocol`` around the plain endpoints
of the cluster file: ``wrapClientTLS`` for dialing, ``TLSMemoryBIOFactory``
for listening, so every endpoint type (TCP, IPv6, host names) gets TLS alike.
Why a verification failed (OpenSSL's alert says only "certificate verify
failed") is noted per connection by a verify callback, for the one log line
that says why a peer was refused.
"""

from __future__ import annotations

import datetime
import weakref
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gossip import certs
from gossip.config import TLSFiles

# OpenSSL's X509_V_ERR_* codes a peer's certificate fails with most, in words.
_VERIFY_ERRORS = {
    2: "its issuer is not a trusted CA",
    7: "its signature does not verify",
    9: "it is not valid yet",
    10: "it has expired",
    18: "it is self-signed",
    19: "it is not signed by a CA of tls_ca (its chain ends in another CA)",
    20: "it is not signed by a CA of tls_ca",
    21: "it is not signed by a CA of tls_ca",
    24: "an intermediate is not a CA",
    26: "it is not meant for this use",
}
# (trustRoot implies requireCertificate; each connection's verify mode adds
# VERIFY_FAIL_IF_NO_PEER_CERT on the listening side too.)
# What OpenSSL's error reasons mean for a peer link, by a word of the reason.
_ALERTS = (
    ("wrong version number", "the peer does not speak TLS (is its cluster.tls false?)"),
    ("http request", "the peer does not speak TLS"),
    ("packet length too long", "the peer does not speak TLS (is its cluster.tls false?)"),
    ("record layer failure", "the peer does not speak TLS (is its cluster.tls false?)"),
    ("did not return a certificate", "the peer presented no certificate"),
    ("certificate required", "the peer wants a certificate we did not send"),
    ("alert unknown ca", "the peer refused our certificate (it does not trust our CA)"),
    ("alert certificate expired", "the peer refused our certificate (expired, says the peer)"),
    ("alert bad certificate", "the peer refused our certificate"),
    ("alert certificate unknown", "the peer refused our certificate"),
    ("alert decrypt error", "the peer refused our certificate"),
)

# Why the peer's certificate failed verification, per TLS connection (weak: a
# closed connection's note goes with it).
_notes: weakref.WeakKeyDictionary[TLSMemoryBIOProtocol, str] = weakref.WeakKeyDictionary()


class TLSSetupError(Exception):
    """This node's TLS files cannot be used; ``str()`` is one line for the operator."""


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class PeerConnectionCreator:
    """One context for both ends of a link (the node's certificate serves both), and a
    verify callback per connection that notes why a peer's certificate failed."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection(tlsProtocol)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection(tlsProtocol)

    def _connection(self, proto: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.options.getContext())
        ref = weakref.ref(proto)

        def verify(
            conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
        ) -> bool:
            if not ok:
                owner = ref()
                if owner is not None and owner not in _notes:
                    what = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
                    _notes[owner] = (
                        f"its certificate ({_subject(cert)}) was refused: {what}"
                        if depth == 0
                        else f"its certificate was refused: {what} (at {_subject(cert)})"
                    )
            return bool(ok)

        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def _subject(cert: crypto.X509) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string()[:100]
    except Exception:
        return "?"


class _TLSServerFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` that lets the wrapped factory refuse a connection
    (returning None, as the handshake-slot limit does) instead of wrapping None."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


@attrs.frozen
class PeerTLS:
    """A node's TLS identity and the CAs it trusts, ready to wrap its peer endpoints."""

    node_id: int
    creator: PeerConnectionCreator
    certificate: x509.Certificate

    def server_factory(self, factory: Factory) -> IProtocolFactory:
        return _TLSServerFactory(self.creator, False, factory)

    def client_endpoint(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        return wrapClientTLS(self.creator, endpoint)


def load_peer_tls(files: TLSFiles, node_id: int, now: datetime.datetime | None = None) -> PeerTLS:
    """Read and check node ``node_id``'s TLS files; TLSSetupError says what is wrong.

    Checked here, at start, what would otherwise make every peer refuse this node
    later: the key belongs to the certificate, the certificate names this node, is
    signed by a CA of the bundle and is valid now.
    """
    try:
        cas = certs.load_certificates(files.ca)
        chain = certs.load_certificates(files.cert)
        key = certs.load_key(files.key)
    except certs.CertError as e:
        raise TLSSetupError(str(e)) from None
    cert = chain[0]
    named = certs.node_id_of(cert)
    if named != node_id:
        who = "no node" if named is None else f"node {named}"
        raise TLSSetupError(f"{files.cert}: the certificate names {who}, not node {node_id}")
    if cert.public_key() != key.public_key():
        raise TLSSetupError(f"{files.key}: this key does not belong to {files.cert}")
    when = now or datetime.datetime.now(datetime.UTC)
    if when < cert.not_valid_before_utc:
        raise TLSSetupError(
            f"{files.cert}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if when > cert.not_valid_after_utc:
        raise TLSSetupError(f"{files.cert}: expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if not any(_issued_by(cert, ca) for ca in cas):
        raise TLSSetupError(
            f"{files.cert}: not signed by a CA of {files.ca} ({len(cas)} CAs there)"
        )
    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        trustRoot=trustRootFromCertificates(
            [Certificate(crypto.X509.from_cryptography(ca)) for ca in cas]
        ),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()  # any OpenSSL complaint now, not at the first connection
    except SSL.Error as e:
        raise TLSSetupError(f"{files.cert}: OpenSSL cannot use it: {_openssl_text(e)}") from None
    return PeerTLS(node_id, PeerConnectionCreator(options), cert)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):
        return False
    return True


def peer_identity(transport: object) -> tuple[int | None, str]:
    """(node id, "") from the peer's certificate on a TLS ``transport``, or (None, why
    there is none). The handshake has finished by the time a frame arrives."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None, "the connection is not TLS"
    cert = get()
    if cert is None:
        return None, "it presented no certificate"
    if not isinstance(cert, x509.Certificate):
        cert = cert.to_cryptography()
    node = certs.node_id_of(cert)
    if node is None:
        return None, f"its certificate ({cert.subject.rfc4514_string()[:100]}) names no node"
    return node, ""


def handshake_problem(transport: object, reason: Failure) -> str | None:
    """Why a TLS handshake on ``transport`` failed, in words; None if ``reason`` is no
    TLS error (the connection was closed or lost as any other)."""
    if not reason.check(SSL.Error):
        return None
    noted = _notes.get(transport) if isinstance(transport, TLSMemoryBIOProtocol) else None
    if noted:
        return noted
    text = _openssl_text(reason.value) if reason.value is not None else "TLS error"
    for word, meaning in _ALERTS:
        if word in text:
            return f"{meaning} [{text}]"
    return f"TLS error: {text}"


def _openssl_text(error: BaseException) -> str:
    """OpenSSL's reasons of an ``SSL.Error`` (a list of (library, function, reason))."""
    parts = []
    for arg in error.args:
        if isinstance(arg, list):
            for item in arg:
                parts.append(str(item[-1]) if isinstance(item, tuple) and item else str(item))
        else:
            parts.append(str(arg))
    return "; ".join(p for p in parts if p) or type(error).__name__
