"""Certificates for TLS and key pairs for SuperNode authentication, made with ``cryptography``.

- :func:`make_tls` writes a self-signed CA (``ca.crt``/``ca.key``) and a server certificate signed by it
  (``server.pem``/``server.key``) whose subjectAltName covers 127.0.0.1, localhost and any extra names
  (e.g. the ``superlink`` service name used inside docker-compose).
- :func:`make_node_keys` writes one ECDSA P-384 key pair per SuperNode in OpenSSH format
  (``node-<i>``, private, and ``node-<i>.pub``), the format ``flwr supernode register`` and
  ``flower-supernode --auth-supernode-private-key`` read.

Both are also a script: ``python -m fedkd.deploy.certs DIR [--nodes N] [--name superlink ...]`` or
``fedkd deploy certs DIR --nodes N``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("127.0.0.1", "localhost")
VALID_DAYS = 365


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path  # --ssl-ca-certfile (SuperLink), --root-certificates (SuperNodes), root-certificates (flwr CLI)
    ca_key: Path
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile


def tls_files(directory: str | Path) -> TLSFiles:
    d = Path(directory)
    return TLSFiles(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")


def node_key_paths(directory: str | Path, index: int) -> tuple[Path, Path]:
    """(private key, public key) of SuperNode ``index``."""
    d = Path(directory)
    return d / f"node-{index}", d / f"node-{index}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _subject_alt_names(names) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def make_tls(directory: str | Path, names=DEFAULT_NAMES, days: int = VALID_DAYS) -> TLSFiles:
    """A CA and a server certificate for ``names`` (IP addresses or DNS names), written under ``directory``."""
    files = tls_files(directory)
    names = list(dict.fromkeys([*DEFAULT_NAMES, *names]))
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkd deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem_key = dict(encoding=serialization.Encoding.PEM, format=serialization.PrivateFormat.TraditionalOpenSSL,
                   encryption_algorithm=serialization.NoEncryption())
    _write(files.ca_key, ca_key.private_bytes(**pem_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_key, server_key.private_bytes(**pem_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_node_keys(directory: str | Path, nodes: int, start: int = 0) -> list[tuple[Path, Path]]:
    """ECDSA P-384 key pairs in OpenSSH format for SuperNodes ``start .. start+nodes-1``."""
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0 (got {nodes})")
    out = []
    for i in range(start, start + nodes):
        priv_path, pub_path = node_key_paths(directory, i)
        key = ec.generate_private_key(ec.SECP384R1())
        priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(priv_path, priv, private=True)
        _write(pub_path, pub + f" fedkd-node-{i}\n".encode())
        out.append((priv_path, pub_path))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write ca.crt, server.pem, server.key and node-<i>[.pub]")
    p.add_argument("--nodes", type=int, default=0, help="also make this many SuperNode key pairs (for --auth)")
    p.add_argument("--name", action="append", default=[], metavar="HOST",
                   help="extra subjectAltName for the server certificate, e.g. superlink (repeatable)")
    p.add_argument("--no-tls", action="store_true", help="only make the node key pairs")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 0:
        raise SystemExit(f"--nodes: must be >= 0 (got {args.nodes})")
    if not args.no_tls:
        files = make_tls(args.directory, names=args.name)
        print(f"wrote {files.ca_cert}, {files.server_cert}, {files.server_key} (CA key: {files.ca_key})")
    for priv, pub in make_node_keys(args.directory, args.nodes):
        print(f"wrote {priv} and {pub}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedkd.deploy.certs", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
