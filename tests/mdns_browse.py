"""Browse one mDNS service type on one interface address and print what was found, as JSON.

``python tests/mdns_browse.py _nexus._tcp.local. --interface 10.1.2.2 --timeout 20``
prints ``{"name", "addresses", "port", "properties", "health"}`` (health: the service's
``/health`` fetched at its announced address) or ``null`` when nothing showed up in time.
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.request
from typing import Any

from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("service")
    parser.add_argument("--interface", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    zc = Zeroconf(interfaces=[args.interface], ip_version=IPVersion.V4Only)
    found: dict[str, Any] = {}
    done = threading.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: Any) -> None:
        if state_change is not ServiceStateChange.Added or done.is_set():
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None:
            return
        found.update(
            name=name,
            addresses=info.parsed_addresses(),
            port=info.port,
            properties={k.decode(): (v or b"").decode() for k, v in info.properties.items()},
        )
        done.set()

    browser = ServiceBrowser(zc, args.service, handlers=[on_change])
    try:
        done.wait(args.timeout)
    finally:
        browser.cancel()
        zc.close()
    if found:
        url = f"http://{found['addresses'][0]}:{found['port']}/health"
        with urllib.request.urlopen(url, timeout=5) as resp:
            found["health"] = json.load(resp)
    print(json.dumps(found or None))  # noqa: T201


if __name__ == "__main__":
    main()
