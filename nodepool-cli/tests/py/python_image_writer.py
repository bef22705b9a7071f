"""Writes image records with the real Python Nodepool 11 code, as its
builder does (tests/interop_python.rs reads them back with our CLI).

Usage: python python_image_writer.py HOSTS CA CERT KEY
  HOSTS like 127.0.0.1:2281/chroot (TLS; Nodepool connects no other way).
Prints one JSON object with the ids it created.
"""
import json
import sys

from nodepool.zk import ZooKeeperClient
from nodepool.zk import zookeeper as zk


def main():
    hosts, ca, cert, key = sys.argv[1:5]
    client = ZooKeeperClient(hosts, tls_ca=ca, tls_cert=cert, tls_key=key)
    client.connect()
    z = zk.ZooKeeper(client, enable_cache=False)

    build = zk.ImageBuild()
    build.state = zk.READY
    build.builder = "py-builder.example.org"
    build.builder_id = "6b2f0a4e-1c1d-4f8e-9a55-3f0a1d2e3b4c"
    build.formats = ["qcow2", "raw"]
    build.username = "zuul"
    build.python_path = "/usr/bin/python3"
    build_id = z.storeBuild("py-image", build)

    upload = zk.ImageUpload(build_id, "sim", "py-image")
    upload.state = zk.READY
    upload.external_id = "py-glance-1"
    upload.external_name = "py-image-1700000000"
    upload.format = "qcow2"
    upload_id = z.storeImageUpload("py-image", build_id, "sim", upload)

    building = zk.ImageBuild()
    building.state = zk.BUILDING
    building.builder = "py-builder.example.org"
    paused_build = z.storeBuild("py-paused", building)
    z.setImagePaused("py-paused", True)
    z.submitBuildRequest("py-image")

    print(json.dumps({
        "build": build_id,
        "upload": upload_id,
        "paused_build": paused_build,
    }), flush=True)
    client.disconnect()


if __name__ == "__main__":
    main()
