"""Reads the pool components with the real Python Nodepool 11 component
registry, as its launchers do (tests/interop_python.rs checks that the
keys we add, such as provider_unavailable, change nothing for it).

Usage: python python_component_reader.py HOSTS CA CERT KEY COUNT
  HOSTS like 127.0.0.1:2281/chroot (TLS; Nodepool connects no other way).
Waits (up to 30 s) until COUNT pool components are in the registry's
cache, then prints them as one JSON list, sorted by id.
"""
import json
import sys
import time

from nodepool.zk import ZooKeeperClient
from nodepool.zk.components import ComponentRegistry


def main():
    hosts, ca, cert, key, count = sys.argv[1:6]
    client = ZooKeeperClient(hosts, tls_ca=ca, tls_cert=cert, tls_key=key)
    client.connect()
    registry = ComponentRegistry(client)
    deadline = time.monotonic() + 30
    while True:
        pools = list(registry.all(kind="pool"))
        if len(pools) >= int(count) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    out = sorted(
        (
            {
                "id": p.id,
                "provider_name": p.provider_name,
                "paused": p.paused,
                "state": p.state,
                "supported_labels": p.supported_labels,
                "model_api": registry.getMinimumModelApi(),
                "provider_unavailable": p.content.get("provider_unavailable"),
            }
            for p in pools
        ),
        key=lambda p: p["id"],
    )
    print(json.dumps(out), flush=True)
    client.disconnect()


if __name__ == "__main__":
    main()
