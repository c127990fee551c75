"""TLS between client, scheduler and workers, on loopback with certificates made here."""

from __future__ import annotations

import datetime
import gc
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client

from hetero_dask.runtime.cluster import make_local_cluster, make_security, open_client


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca_and_cert(folder, tag: str):
    """A self-signed CA and a certificate for localhost signed by it: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(
        not_valid_before=now - datetime.timedelta(minutes=5),
        not_valid_after=now + datetime.timedelta(days=1),
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(
            subject_name=_name(f"{tag} test CA"),
            issuer_name=_name(f"{tag} test CA"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder(
            subject_name=_name("localhost"),
            issuer_name=ca.subject,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            **valid,
        )
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / f"{tag}-ca.pem", folder / f"{tag}-cert.pem", folder / f"{tag}-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths[2])
    return paths


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ours = make_ca_and_cert(folder, "ours")
    security = make_security(*ours)
    cluster = make_local_cluster(
        workers=1, security=security, dashboard=False, processes=False, host="127.0.0.1"
    )
    with cluster:
        yield cluster, ours, folder


def test_client_with_certificate_runs_a_task(tls_cluster):
    cluster, ours, _ = tls_cluster
    assert cluster.scheduler_address.startswith("tls://")
    with open_client(
        cluster.scheduler_address, security=make_security(*ours), quiet=True
    ) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=10) == 6
        workers = client.scheduler_info()["workers"]
        assert workers and all(addr.startswith("tls://") for addr in workers)


def _refused_client(address, **kwargs):
    """Construct a Client that must fail. A refused Client is left half-started; if the
    garbage collector finalises it inside ANOTHER Client's start, distributed's loop
    runner deadlocks (seen once in a full run), so collect before and after."""
    gc.collect()
    try:
        Client(address, timeout="3s", **kwargs)
    finally:
        gc.collect()


def test_client_without_certificate_is_refused(tls_cluster):
    cluster, _, _ = tls_cluster
    with pytest.raises(Exception, match="(?i)tls|ssl|security"):
        _refused_client(cluster.scheduler_address)


def test_client_with_certificate_from_another_ca_is_refused(tls_cluster):
    cluster, _, folder = tls_cluster
    theirs = make_ca_and_cert(folder, "theirs")
    with pytest.raises(OSError):
        _refused_client(cluster.scheduler_address, security=make_security(*theirs))


def test_missing_certificate_file_is_a_clear_error(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(FileNotFoundError, match="TLS certificate .*nope.pem"):
        make_security(ca, tmp_path / "nope.pem")
