"""Discovery across hosts: Nexus announces itself in one network namespace and a browser finds it
from another, over a veth pair. Both ends are test hosts this test makes and removes; zeroconf is
pinned to the veth addresses, so nothing is sent anywhere else. Needs root and iproute2: when the
machine does not allow it, the test is skipped and says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEXUS = Path(sys.executable).parent / "nexus"


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip); not available here")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"nexus-a-{tag}", f"nexus-b-{tag}"
    subnet = f"10.231.{os.getpid() % 250}"
    ip_a, ip_b = f"{subnet}.1", f"{subnet}.2"
    steps = [
        ("ip", "netns", "add", ns_a),
        ("ip", "netns", "add", ns_b),
        ("ip", "link", "add", f"nxa{tag}", "type", "veth", "peer", "name", f"nxb{tag}"),
        ("ip", "link", "set", f"nxa{tag}", "netns", ns_a),
        ("ip", "link", "set", f"nxb{tag}", "netns", ns_b),
        ("ip", "-n", ns_a, "addr", "add", f"{ip_a}/24", "dev", f"nxa{tag}"),
        ("ip", "-n", ns_b, "addr", "add", f"{ip_b}/24", "dev", f"nxb{tag}"),
        ("ip", "-n", ns_a, "link", "set", f"nxa{tag}", "up"),
        ("ip", "-n", ns_b, "link", "set", f"nxb{tag}", "up"),
        ("ip", "-n", ns_a, "link", "set", "lo", "up"),
        ("ip", "-n", ns_b, "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            result = sh(*step)
            if result.returncode != 0:
                pytest.skip(f"cannot build test hosts ({' '.join(step)}): {result.stderr.strip()}")
        yield ns_a, ip_a, ns_b, ip_b
    finally:
        sh("ip", "netns", "del", ns_a)
        sh("ip", "netns", "del", ns_b)


def test_nexus_announced_in_one_namespace_is_found_from_another(two_hosts):
    ns_a, ip_a, ns_b, ip_b = two_hosts
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text(
            f'[server]\nhost = "{ip_a}"\nport = 18080\n'
            f'[discovery]\ninterfaces = ["{ip_a}"]\nprobe_local_ports = []\nadvertise = true\n'
            "[embedded]\nenabled = false\n"
        )
        env = {**os.environ, "NEXUS_CACHE_DIR": tmp}
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns_a, str(NEXUS), "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            browse = sh(
                "ip", "netns", "exec", ns_b, sys.executable, str(ROOT / "tests" / "mdns_browse.py"),
                "_nexus._tcp.local.", "--interface", ip_b, "--timeout", "20",
            )  # fmt: skip
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=20)
    assert browse.returncode == 0, browse.stderr
    found = json.loads(browse.stdout)
    assert found is not None, f"nothing announced; nexus said:\n{stderr}"
    assert found["addresses"] == [ip_a]
    assert found["port"] == 18080
    assert found["properties"]["api_path"] == "/v1"
    assert found["health"]["status"] == "unhealthy"  # reachable at the announced address
    assert server.returncode == 0
