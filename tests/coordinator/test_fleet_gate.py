"""The coordinator's public port passes Flower's Fleet API and nothing else (issue 17, finding 1), and SIGTERM stops
``serve`` with everything it started (finding 8).

On Flower 1.41 one SuperLink port serves the Fleet, Control and Runtime APIs, and the Control API runs anyone's app.
Here a real ``fftmoe-coordinator serve`` runs; a stranger with only its address tries ``flwr run`` with their own
app, whose ServerApp would write a marker file on the coordinator's host: through the public port it is refused and
the marker never appears. The same attack on the SuperLink's loopback port succeeds, which shows the attack is real
(and why docs/security.md tells operators of multi-user hosts to keep other users off loopback).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from coordinator.deploy import free_port, stop
from coordinator.fleet_gate import FLEET_ROUTES, allowed
from tests.coordinator.test_federation import BIN


def test_the_gate_passes_exactly_flowers_fleet_routes() -> None:
    """The allowlist is Flower's own Fleet router, route for route: an upgrade that adds one fails here."""
    from flwr.superlink.routers.fleet.router import router

    flower = sorted(route.path.removeprefix("/v1/fleet/") for route in router.routes)
    assert sorted(FLEET_ROUTES) == flower
    assert allowed("POST", "/v1/fleet/pull-messages")
    for method, path in (("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
                         ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/pull-messages/x"), ("POST", "/docs"),
                         ("POST", "/v1/fleet/"), ("POST", "/v1/fleetpull-messages")):  # fmt: skip
        assert not allowed(method, path), (method, path)


def stranger_app(folder: Path, marker: Path) -> Path:
    """A Flower app whose ServerApp writes ``marker`` where it runs: what an attacker submits with ``flwr run``."""
    app = folder / "stranger-app"
    (app / "strangerapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "strangerapp"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "stranger"\n\n'
        '[tool.flwr.app.components]\nserverapp = "strangerapp.app:server"\nclientapp = "strangerapp.app:client"\n'
    )
    (app / "strangerapp" / "__init__.py").write_text("")
    (app / "strangerapp" / "app.py").write_text(
        "import os\nfrom pathlib import Path\nfrom flwr.clientapp import ClientApp\nfrom flwr.serverapp import ServerApp\n"
        "server = ServerApp()\nclient = ClientApp()\n\n@server.main()\ndef main(grid, context):\n"
        f"    Path({str(marker)!r}).write_text(f'stranger code ran as pid {{os.getpid()}}')\n"
    )
    return app


def flwr_cli(args: list[str], home: Path, address: str, ca: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ``flwr`` CLI against ``address`` as a stranger with their own FLWR_HOME: insecure, or trusting ``ca``."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{address}"\n{tls}\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def flwr_run(app: Path, home: Path, address: str, ca: Path | None = None) -> subprocess.CompletedProcess:
    """``flwr run APP x --stream``: what a stranger with only the coordinator's address would try."""
    return flwr_cli(["run", str(app), "x", "--stream"], home, address, ca)


def family_of(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` and a restarted server can bind it (as servers do, with SO_REUSEADDR: a closed
    connection's TIME_WAIT does not block it)."""
    if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in psutil.net_connections("tcp")):
        return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_a_stranger_cannot_run_code_through_the_public_port_and_sigterm_stops_everything(tiny_bundle: Path, tmp_path: Path) -> None:
    port = free_port()
    cmd = [str(BIN / "fftmoe-coordinator"), "serve", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "state"), "--rounds", "1",
           "--min-clients", "1", "--insecure", "--port", str(port), "--wait-seconds", "600", "--json"]  # fmt: skip
    serve = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("flwr-serverapp" in cmdline(c) for c in family_of(serve)):
            assert serve.poll() is None, serve.communicate()
            time.sleep(1.0)
        family = family_of(serve)
        superlink = next(c for c in family if "flower-superlink" in cmdline(c))
        args = superlink.cmdline()
        link_port = int(args[args.index("--port") + 1])
        assert args[args.index("--host") + 1] == "127.0.0.1" and link_port != port

        # The stranger, through the public port: refused, and their ServerApp never runs.
        marker = tmp_path / "stranger-ran.txt"
        app = stranger_app(tmp_path, marker)
        refused = flwr_run(app, tmp_path / "stranger-home", f"127.0.0.1:{port}")
        assert refused.returncode != 0, refused.stdout + refused.stderr
        time.sleep(3.0)
        assert not marker.exists()
        for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
                             ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
                             ("GET", "/v1/fleet/get-run"), ("POST", "/v1/fleet/%2e%2e/control/start-run")):  # fmt: skip
            r = httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=10)
            assert r.status_code == 404, (method, path, r.status_code)
        gate_log = (tmp_path / "state" / "fleet-gate.log").read_text()
        assert "refused POST /v1/control/start-run" in gate_log and "not a Fleet API route" in gate_log
        # A device's request passes (the SuperLink answers it: here with an error, as the body is not a real one).
        passed = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"", timeout=10)
        assert passed.status_code != 404 or "not found" not in passed.text

        # The same attack on the SuperLink's own (loopback) port works: the threat the gate removes is real.
        direct = flwr_run(app, tmp_path / "stranger-home2", f"127.0.0.1:{link_port}")
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(1.0)
        assert marker.exists(), direct.stdout + direct.stderr

        # SIGTERM (kill PID, systemctl stop) stops the gate, SuperLink, SuperExec and ServerApp, and frees the ports.
        family = family_of(serve)
        assert any("fleet_gate" in cmdline(c) for c in family) and any("flwr-serverapp" in cmdline(c) for c in family)
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=90)
        assert serve.returncode == 130, f"{serve.returncode}\n{out}\n{err[-3000:]}"
        _, alive = psutil.wait_procs(family, timeout=30)
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], [cmdline(c)[:100] for c in alive]
        assert port_free(port) and port_free(link_port)
    finally:
        stop(serve, timeout=5)
