"""TLS and mutual TLS for the gRPC port, with certificate rotation without a restart; TLS credentials for
clients (the CLI, ``lethe health``).

Server: :func:`server_credentials` builds gRPC's *dynamic* SSL credentials. gRPC calls the fetcher before
every new TLS handshake; :class:`CertificateFiles` answers "no change" from a ``stat`` of the three files
(size, mtime, inode: cert-manager and Kubernetes Secret volumes swap a symbolic link, which changes the
inode) and re-reads them only when one changed. A new set is validated first (the chain and the key parse,
the key belongs to the leaf certificate, the CA bundle parses): a half-written or mismatched pair keeps the
previous configuration and is retried at the next handshake, so a rotation can never take the port down.
Connections already open keep the certificate they were made with; new ones get the new one.

With ``tls_client_ca`` set, the handshake requires a client certificate signed by it (mutual TLS); gRPC then
exposes the certificate's subject CN to :mod:`service.api.auth` (``x509_common_name``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger(__name__)


class CertificateFiles:
    """The server's certificate chain, key and (optional) client CA bundle, reloaded when they change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.paths = (Path(cert), Path(key), Path(client_ca) if client_ca else None)
        self._lock = threading.Lock()
        self._state: tuple | None = None
        self.reloads = 0  # configurations handed to gRPC after the first (for tests and logs)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The first configuration; invalid files are a start-up error here, not later."""
        with self._lock:
            state = self._stat()
            configuration = self._load()
            self._state = state
            return configuration

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files changed, else None.
        Never raises (an exception here would fail the handshake)."""
        try:
            with self._lock:
                state = self._stat()
                if state == self._state:
                    return None
                configuration = self._load()
                self._state = state
                self.reloads += 1
            log.info("TLS certificate files changed: new handshakes use the new configuration")
            return configuration
        except Exception as error:  # a rotation in progress (half-written file) or a bad new pair
            log.warning("TLS certificate files changed but are not usable yet; keeping the previous ones: %s", error)
            return None

    def _stat(self) -> tuple:
        states = []
        for path in self.paths:
            if path is None:
                states.append(None)
                continue
            stat = os.stat(path)
            states.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
        return tuple(states)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_path, key_path, ca_path = self.paths
        chain, key = cert_path.read_bytes(), key_path.read_bytes()
        check_key_pair(chain, key)
        client_ca = None
        if ca_path is not None:
            client_ca = ca_path.read_bytes()
            if not x509.load_pem_x509_certificates(client_ca):
                raise ValueError("the client CA bundle holds no certificate")
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)


def check_key_pair(chain_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless ``key_pem`` is the private key of the first certificate of ``chain_pem``."""
    certificates = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificates[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the private key does not belong to the certificate")


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> tuple[grpc.ServerCredentials,
                                                                              CertificateFiles]:
    """TLS credentials for ``server.add_secure_port`` that follow the files, and the files' watcher."""
    files = CertificateFiles(cert, key, client_ca)
    credentials = grpc.dynamic_ssl_server_credentials(files.initial(), files.fetch,
                                                      require_client_authentication=client_ca is not None)
    return credentials, files


def channel_credentials(ca: Path | None, cert: Path | None = None,
                        key: Path | None = None) -> grpc.ChannelCredentials:
    """Client TLS: verify the server against ``ca`` (None: the system roots) and, for mutual TLS, present
    ``cert``/``key``."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key and cert else None,
        certificate_chain=Path(cert).read_bytes() if key and cert else None)


def first_dns_name(cert: Path) -> str | None:
    """The first DNS name of a certificate's subjectAltName (what a probe inside the pod should expect when it
    connects to 127.0.0.1 with the pod's own certificate), or None."""
    try:
        certificate = x509.load_pem_x509_certificates(Path(cert).read_bytes())[0]
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None
