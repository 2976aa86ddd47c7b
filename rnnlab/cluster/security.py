"""TLS with client certificates for the Dask clusters that run sweeps (docs/cluster.md).

A Dask scheduler runs whatever its clients send (`Client.run`, pickled tasks) on its workers,
with the logins the workers hold. So every connection is TLS, both ends show a certificate of
the lab's CA, and a plain `tcp://` address is refused before any connection unless the user
says `--insecure` (`check_address`). Dask's own `distributed.Security` does the TLS; this module
makes the certificates (`make_certs`, `rnnlab cluster certs DIR`) and picks the submitter's
(`client_security`).
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import re
from pathlib import Path

from rnnlab.errors import UserError

ROLES = ("scheduler", "worker")
SCHEME = re.compile(r"([a-z0-9+]+)://")
CONFIG_KEYS = ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert",
               "distributed.comm.tls.client.key")
HOWTO = ("give --tls-ca-file, --tls-cert and --tls-key (`rnnlab cluster certs DIR` makes them), "
         "or set distributed.comm.tls.ca-file, .client.cert and .client.key in Dask's config")


def check_address(address: str, insecure: bool) -> str:
    """`address` if the submitter may connect to it: tls://, or tcp:// with --insecure (then a
    warning says who can run code on the workers); else a UserError, before any connection."""
    m = SCHEME.match(address)
    scheme = m.group(1) if m else "tcp"  # Dask's default for host:port
    if scheme == "tls":
        return address
    if scheme == "tcp" and insecure:
        import sys

        print(f"warning: --insecure: anyone who can reach {address} can run code on its workers, "
              "with the logins the workers hold", file=sys.stderr, flush=True)
        return address
    if scheme == "tcp":
        raise UserError(f"--scheduler {address}: plain TCP lets anyone who reaches the scheduler run "
                        "code on its workers with their logins; start it with TLS (docs/cluster.md) "
                        "and give tls://HOST:PORT, or add --insecure on a network only you reach")
    raise UserError(f"--scheduler {address}: {scheme}:// is not supported: give tls://HOST:PORT")


def client_security(ca: str | None, cert: str | None, key: str | None):
    """The submitter's `distributed.Security`: from the flags (all three), else from Dask's
    config; TLS required. Missing or unreadable files are one line."""
    import dask
    from distributed import Security

    flags = [ca, cert, key]
    if any(flags) and not all(flags):
        raise UserError(f"--tls-ca-file, --tls-cert and --tls-key go together; {HOWTO}")
    if not any(flags):
        flags = [dask.config.get(k, None) for k in CONFIG_KEYS]
        if not all(flags):
            raise UserError(f"no client certificate for a TLS scheduler: {HOWTO}")
    for path in flags:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such certificate or key file; {HOWTO}")
    ca, cert, key = flags
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                    require_encryption=True)


def local_security():
    """A cluster on this machine: a certificate made now, in memory, known to this process and
    the workers it starts only."""
    from distributed import Security

    return Security.temporary()


# --- certificates ----------------------------------------------------------------------------

def make_certs(folder: Path, submitters: list[str], hosts: list[str], days: int = 365) -> list[Path]:
    """The lab's CA (made once) and the certificates it signs: scheduler, worker, and one per
    submitter; existing files are kept. -> the files written now, keys mode 0600: ca.pem and
    ca-key.pem (the CA: keep its key off the cluster), scheduler.pem/-key.pem,
    worker.pem/-key.pem, and NAME.pem/-key.pem with NAME.dask.yaml (Dask's config for that
    submitter) for each submitter. Run again with new names, it adds their certificates from the
    same CA and changes nothing else."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from rnnlab.cluster.trust import check_name

    for name in submitters:
        check_name("--submitter", name)
        if name in ROLES or name == "ca":
            raise UserError(f"--submitter {name}: the name of a role's certificate; choose another")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ca_cert, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    if ca_cert.exists() != ca_key.exists():
        raise UserError(f"{folder}: one of ca.pem and ca-key.pem is missing; restore it, or use a "
                        "new folder (every certificate must then be made again)")
    if not ca_cert.exists():
        key = _key()
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rnnlab cluster CA")])
        cert = _build(name, name, key.public_key(), key, days, ca=True)
        written += _write(folder, "ca", cert, key)
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    for role in [*ROLES, *submitters]:
        if (folder / f"{role}.pem").exists():
            continue
        key = _key()
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, role)])
        cert = _build(subject, ca.subject, key.public_key(), signer, days, hosts=hosts)
        written += _write(folder, role, cert, key)
        if role not in ROLES:
            written.append(_dask_config(folder, role))
    return written


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _build(subject, issuer, public_key, signer, days: int, ca: bool = False, hosts=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), True)
    else:  # each end of a Dask connection may be either side of it
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        names = [_san(h) for h in ["localhost", "127.0.0.1", *hosts]]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(signer, hashes.SHA256())


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(folder: Path, name: str, cert, key) -> list[Path]:
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = folder / f"{name}-key.pem", folder / f"{name}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return [cert_path, key_path]


def _dask_config(folder: Path, name: str) -> Path:
    """Dask's config for submitter `name` (copy it to ~/.config/dask/): its certificate, the
    CA, TLS required."""
    import yaml

    root = folder.resolve()
    tls = {"ca-file": str(root / "ca.pem"),
           "client": {"cert": str(root / f"{name}.pem"), "key": str(root / f"{name}-key.pem")}}
    path = folder / f"{name}.dask.yaml"
    path.write_text(yaml.safe_dump({"distributed": {"comm": {"require-encryption": True,
                                                              "tls": tls}}}, sort_keys=False))
    return path


def default_submitter() -> str:
    """This login's name, as a certificate's name (a name rnnlab accepts)."""
    from rnnlab.cluster.trust import is_name

    user = re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())
    return user if is_name(user) and user not in ROLES else "submitter"
