"""Loopback federation over TLS with SuperNode authentication: a registered device trains a round; a device whose
key is not registered is refused and its join gives up with exit code 1 (Flower's own TLS and authentication)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from pathlib import Path

from coordinator.deploy import free_port, stop, wait_for_port
from coordinator.state import GlobalState
from edge_runtime.bundle import load_manifest
from edge_runtime.update import manifest_id
from tests.conftest import write_tiny_csv
from tests.coordinator.test_federation import BIN, finish
from tests.coordinator.test_fleet_gate import flwr_cli, flwr_run, stranger_app


def make_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for localhost / 127.0.0.1 (what the README does with openssl)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool):  # noqa: ANN001, ANN202
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = cert("fftmoe-test-ca", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fftmoe-test-ca")]), ca_key, True)
    srv_cert = cert("localhost", srv_key, ca_cert.subject, ca_key, False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(srv_cert.public_bytes(pem))
    paths[2].write_bytes(srv_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ssh-keygen -t ecdsa -b 384 writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" " + name.encode())
    private.chmod(0o600)
    return private, public


def assert_no_secrets_logged(root: Path, private_keys: list[Path]) -> None:
    """No line of any private key's body appears in a log, config or state file the run wrote under ``root``."""
    secrets = {line.strip() for k in private_keys for line in k.read_text().splitlines() if len(line.strip()) >= 40 and "-----" not in line}
    assert secrets
    written = [f for f in root.rglob("*") if f.suffix in (".log", ".json", ".jsonl", ".toml", ".txt") and f.is_file()]
    assert any(f.suffix == ".log" for f in written), "the run wrote no logs to scan"
    for f in written:
        text = f.read_text(errors="replace")
        leaked = sum(s in text for s in secrets)
        assert not leaked, f"{f}: holds {leaked} line(s) of private key material"


def test_tls_and_node_authentication(tiny_bundle: Path, tmp_path: Path) -> None:
    ca, cert, key = make_tls(tmp_path)
    good, good_pub = make_node_key(tmp_path, "device1")
    stranger, _ = make_node_key(tmp_path, "stranger")
    port = free_port()
    state_dir = tmp_path / "state"
    cmd = [str(BIN / "fftmoe-coordinator"), "serve", "--bundle", str(tiny_bundle), "--state-dir", str(state_dir), "--rounds", "1",
           "--min-clients", "1", "--port", str(port), "--local-steps", "1", "--batch-size", "4", "--eval-every", "0",
           "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--authorized-key", str(good_pub),
           "--round-timeout", "240", "--wait-seconds", "240", "--json"]  # fmt: skip
    coordinator = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    joins = []
    try:
        for name, private, retry in (("device1", good, "600"), ("stranger", stranger, "20")):
            data = write_tiny_csv(tmp_path / f"{name}.csv", 20, seed=len(name))
            join = [str(BIN / "fftmoe-edge"), "join", "--server", f"localhost:{port}", "--data", str(data), "--tier", "2",
                    "--root-certificates", str(ca), "--auth-key", str(private), "--cache-dir", str(tmp_path / f"cache-{name}"),
                    "--threads", "1", "--retry-seconds", retry]  # fmt: skip
            joins.append(subprocess.Popen(join, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True))
        # With TLS and node authentication on, a stranger holding only ca.pem can neither register a key nor run an app
        # through the public port (Flower's Control API behind it would accept both: issue 17).
        wait_for_port("127.0.0.1", port, 240, coordinator, what="serve")
        marker = tmp_path / "stranger-ran.txt"
        _, stranger_pub = make_node_key(tmp_path, "stranger2")
        register = flwr_cli(["supernode", "register", str(stranger_pub), "x"], tmp_path / "stranger-cli", f"localhost:{port}", ca)
        run = flwr_run(stranger_app(tmp_path, marker), tmp_path / "stranger-cli", f"localhost:{port}", ca)
        assert register.returncode != 0 and run.returncode != 0, (register.stdout + register.stderr, run.stdout + run.stderr)
        result = finish(coordinator, 600)
        assert not marker.exists()
        assert "refused POST /v1/control/register-node" in (state_dir / "fleet-gate.log").read_text()
        assert result["ok"] and result["rounds_done"] == 1, result
        state = GlobalState.load(state_dir, manifest_id(load_manifest(tiny_bundle)))
        assert len([h for h in state.history if "accepted" in h][-1]["accepted"]) == 1  # round 1 (not the head's records)
        _, err = joins[1].communicate(timeout=300)  # refused until its retry window closes
        assert joins[1].returncode == 1 and "no connection" in err
        log = next((tmp_path / "cache-stranger").glob("supernode-*/supernode.log")).read_text()
        assert "Failed to activate SuperNode" in log or "PERMISSION_DENIED" in log or "denied" in log.lower(), log[-2000:]
        for p in [coordinator, *joins]:  # everything flushed and closed before the logs are read
            stop(p, timeout=5)
        assert_no_secrets_logged(tmp_path, [key, good, stranger])
    finally:
        for p in [coordinator, *joins]:
            stop(p, timeout=5)
