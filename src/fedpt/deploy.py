"""Thin helpers for running FedPT on Flower's deployment engine (``docs/deployment.md``).

``fedpt deploy certs DIR``: a private CA, the SuperLink's TLS certificate (with the SANs of the
hosts the SuperNodes and ``flwr`` use to reach it) and, optionally, one SuperNode
authentication key pair per device, all made with ``cryptography``:

- ``ca.crt`` (give to every SuperNode: ``--root-certificates``; to ``flwr``: ``root-certificates``
  in ``$FLWR_HOME/config.toml``; and to the SuperLink: ``--ssl-ca-certfile``), ``ca.key`` (keep
  offline: it signs certificates);
- ``server.pem`` / ``server.key``: the SuperLink's ``--ssl-certfile`` / ``--ssl-keyfile``;
- ``node-<i>.key`` / ``node-<i>.pub``: device ``i``'s SuperNode key in OpenSSH format, ECDSA
  P-384 as Flower 1.42 requires (``flower-supernode --auth-supernode-private-key node-<i>.key``;
  the public half is registered with ``flwr supernode register node-<i>.pub``).

The transport, the authentication and the registry are Flower's; nothing here talks to the network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from fedpt.errors import FedPTError

# Always in the SANs: the SuperLink starts its own SuperExec, which reaches the SuperLink's
# Runtime API over TLS on the loopback address, whatever the public host name is.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


def make_certificates(out: Path, hosts: list[str] | tuple[str, ...] = (), nodes: int = 0,
                      days: int = 365, overwrite: bool = False) -> list[Path]:
    """Write the CA, the SuperLink's certificate for ``hosts`` (plus loopback) and ``nodes`` SuperNode
    key pairs; returns the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_HOSTS]))
    if nodes < 0 or days <= 0:
        raise FedPTError(f"--nodes must be >= 0 and --days > 0, got {nodes} and {days}")
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"node-{i}.{ext}" for i in range(1, nodes + 1) for ext in ("key", "pub")]
    existing = [name for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise FedPTError(f"{out} already holds {', '.join(existing[:3])}: pass --overwrite to replace them "
                         "(certificates signed by the old CA stop working) or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FedPT deployment CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid_from).not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    written = [
        _write(out / "ca.crt", ca_cert.public_bytes(pem)),
        _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, none), secret=True),
        _write(out / "server.pem", server_cert.public_bytes(pem)),
        _write(out / "server.key", server_key.private_bytes(pem, pkcs8, none), secret=True),
    ]
    for i in range(1, nodes + 1):
        node_key = ec.generate_private_key(ec.SECP384R1())
        written.append(_write(out / f"node-{i}.key", node_key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, none), secret=True))
        written.append(_write(out / f"node-{i}.pub", node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" fedpt-node-{i}\n".encode()))
    return written


def _san(host: str):
    """An IP address SAN for addresses, a DNS name SAN otherwise (TLS clients check the matching kind)."""
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    """Private keys are created readable by their owner only (never world-readable, not even briefly)."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


# -- stopping what was started ----------------------------------------------------------------

def stop_process_tree(pid: int, timeout: float = 15.0) -> list[int]:
    """Stop process ``pid``, everything it started, and the process groups they detached; returns the PIDs.

    Flower's SuperLink starts its SuperExec (and that the ServerApp, the simulation and Ray) in
    new sessions (``start_new_session``), and a killed parent's children are re-parented away,
    so the whole tree is listed *before* anything is signalled. Each listed process, and the
    process group of each that leads one, gets SIGTERM, then SIGKILL after ``timeout`` seconds.
    Nothing is looked up by name: on a shared host, other people's Flower processes are untouched.
    """
    import signal

    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    groups = set()
    for proc in procs:
        try:
            if os.getpgid(proc.pid) == proc.pid:  # a group leader: Flower detached it (or we did)
                groups.add(proc.pid)
        except ProcessLookupError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs:
            try:
                proc.send_signal(sig)  # psutil refuses a PID that was reused by another process
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        if not alive:
            break
    return [proc.pid for proc in procs]


def listening_pid(port: int, host: str = "127.0.0.1") -> int | None:
    """The PID of this user's process listening on ``host:port`` (None when there is none)."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            if conn.laddr.ip in (host, "0.0.0.0", "::"):
                return conn.pid
    return None


def stop_local_superlink(port: int | None = None) -> list[int]:
    """Stop the local SuperLink that ``flwr run .`` started (and left running) and its process tree.

    ``flwr run .`` with the default ``local`` connection starts ``flower-superlink`` detached on
    127.0.0.1:39091 (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) and reuses it for later runs; Flower
    1.42 has no command to stop it.
    """
    port = port or int(os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091"))
    pid = listening_pid(port)
    if pid is None:
        raise FedPTError(f"no local SuperLink of yours listens on 127.0.0.1:{port} (set "
                         "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT if flwr used another port)")
    return stop_process_tree(pid)
