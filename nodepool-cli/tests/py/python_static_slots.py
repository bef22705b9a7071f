"""Shows how the real Python Nodepool 11 static driver sees the nodes in
ZooKeeper: its own slot bookkeeping (`StaticNodeProvider.getRegisteredNodes`,
what decides whether it registers a host again) run on the records there
(tests/interop_python.rs checks that nodes our launcher registered fill
exactly the slots Python would fill, so a mixed fleet registers nothing
twice).

Usage: python python_static_slots.py HOSTS CA CERT KEY CONFIG PROVIDER
  HOSTS like 127.0.0.1:2281/chroot (TLS; Nodepool connects no other way).
Prints {"<host>|<user>|<port>": [node id or null per slot, ...]} as JSON.
"""
import json
import sys

from nodepool import config as nodepool_config
from nodepool.driver.static.provider import StaticNodeProvider
from nodepool.zk import ZooKeeperClient
from nodepool.zk.zookeeper import ZooKeeper


def main():
    hosts, ca, cert, key, config_path, provider_name = sys.argv[1:7]
    client = ZooKeeperClient(hosts, tls_ca=ca, tls_cert=cert, tls_key=key)
    client.connect()
    config = nodepool_config.loadConfig(config_path)
    provider = StaticNodeProvider(config.providers[provider_name])
    provider.zk = ZooKeeper(client, enable_cache=False)
    provider.getRegisteredNodes()
    out = {
        "|".join(str(part) for part in node_tuple): [
            getattr(node, "id", None) for node in slots
        ]
        for node_tuple, slots in provider._node_slots.items()
    }
    print(json.dumps(out, sort_keys=True), flush=True)
    client.disconnect()


if __name__ == "__main__":
    main()
