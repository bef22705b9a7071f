#!/usr/bin/env python3
"""An example cloud for Nodepool's `driver: external` (Python 3, stdlib only).

It speaks the protocol of docs/external-provider.md on stdin/stdout: one
JSON object per line in, one per line out. Its "cloud" is a JSON file (the
first argument, else $EXAMPLE_CLOUD_STATE), so that a restarted program,
several programs at once (each launcher runs its own) and the launcher's
leak listing all see the same servers and images. Servers have no network:
the handshake says `skip_nodescan`.

Flavors: `small` (1 vCPU, 1 GiB), `medium` (2 vCPUs, 4 GiB) and `huge`
(64 vCPUs, 256 GiB, more than the quota of 32 vCPUs: its launches are
refused for quota).
"""

import fcntl
import hashlib
import json
import os
import sys
import uuid

VERSION = 1
FLAVORS = {
    "small": {"cores": 1, "ram": 1024},
    "medium": {"cores": 2, "ram": 4096},
    "huge": {"cores": 64, "ram": 262144},
}
QUOTA = {"instances": 20, "cores": 32, "ram": 65536}
METADATA_LIMIT = 255


class Refused(Exception):
    """An answer with `ok: false`; `kind` is one of the protocol's kinds."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class State:
    """The cloud file, read and written under an exclusive lock."""

    def __init__(self, path):
        self.path = path
        self.lock_path = path + ".lock"

    def __enter__(self):
        self.lock = open(self.lock_path, "a")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except FileNotFoundError:
            self.data = {}
        self.data.setdefault("servers", {})
        self.data.setdefault("images", {})
        return self.data

    def __exit__(self, kind, value, tb):
        if kind is None:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def flavor_of(label):
    name = label.get("flavor_name")
    if name is None:
        # The smallest flavor with enough RAM.
        need = label.get("min_ram") or 0
        fits = [n for n, f in FLAVORS.items() if f["ram"] >= need]
        if not fits:
            raise Refused("invalid", "no flavor has %s MiB of RAM" % need)
        return min(fits, key=lambda n: FLAVORS[n]["ram"])
    if name not in FLAVORS:
        raise Refused("invalid", "unknown flavor %r" % name)
    return name


def resources_of(label):
    f = FLAVORS[flavor_of(label)]
    r = {"instances": 1, "cores": f["cores"], "ram": f["ram"]}
    if label.get("boot_from_volume"):
        r["volumes"] = 1
        r["volume-gb"] = label.get("volume_size") or 0
    return r


def shorten(value):
    """Cut at METADATA_LIMIT bytes on a character boundary, as Nova does."""
    raw = value.encode("utf-8")[:METADATA_LIMIT]
    return raw.decode("utf-8", errors="ignore")


def server_view(s):
    return {
        "id": s["id"],
        "name": s["name"],
        "status": s["status"],
        "metadata": s["metadata"],
        "private_ipv4": s["ip"],
        "interface_ip": s["ip"],
        "az": s["az"],
        "resources": s["resources"],
    }


def op_quota_limits(state, req):
    return QUOTA


def op_label_resources(state, req):
    return resources_of(req["label"])


def op_create_server(state, req):
    spec = req["spec"]
    need = resources_of(spec["label"])
    used = {"instances": 0, "cores": 0, "ram": 0}
    for s in state["servers"].values():
        for k in used:
            used[k] += s["resources"].get(k, 0)
    for k, limit in QUOTA.items():
        if used[k] + need.get(k, 0) > limit:
            raise Refused("quota", "quota exceeded for %s: %d of %d used, %d asked"
                          % (k, used[k], limit, need.get(k, 0)))
    sid = str(uuid.uuid4())
    n = len(state["servers"]) % 250 + 2
    state["servers"][sid] = {
        "id": sid,
        "name": spec["name"],
        "status": "active",
        "metadata": {k: shorten(v) for k, v in spec["metadata"].items()},
        "ip": "203.0.113.%d" % n,
        "az": spec.get("availability_zone") or "example-az",
        "resources": need,
    }
    return {"id": sid}


def op_get_server(state, req):
    s = state["servers"].get(req["server_id"])
    return None if s is None else server_view(s)


def op_list_servers(state, req):
    return [server_view(s) for s in state["servers"].values()]


def op_delete_server(state, req):
    if state["servers"].pop(req["server_id"], None) is None:
        raise Refused("not_found", "no server %s" % req["server_id"])
    return None


def op_console_log(state, req):
    s = state["servers"].get(req["server_id"])
    if s is None:
        raise Refused("not_found", "no server %s" % req["server_id"])
    return "example-cloud: %s booted\nlogin: " % s["name"]


def op_upload_image(state, req):
    image = req["image"]
    md5 = hashlib.md5()
    sha256 = hashlib.sha256()
    try:
        with open(image["path"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
                sha256.update(block)
    except OSError as e:
        raise Refused("invalid", "cannot read %s: %s" % (image["path"], e))
    for name, h in (("md5", md5), ("sha256", sha256)):
        want = image.get(name)
        if want is not None and want.lower() != h.hexdigest():
            raise Refused("invalid", "%s mismatch: expected %s, file has %s"
                          % (name, want, h.hexdigest()))
    iid = str(uuid.uuid4())
    state["images"][iid] = {
        "id": iid,
        "name": image["name"],
        "status": "active",
        "properties": image.get("properties") or {},
    }
    return {"id": iid}


def op_list_images(state, req):
    return list(state["images"].values())


def op_delete_image(state, req):
    if state["images"].pop(req["image_id"], None) is None:
        raise Refused("not_found", "no image %s" % req["image_id"])
    return None


def op_list_resources(state, req):
    # No floating IPs or ports in this cloud: nothing can leak.
    return []


def op_delete_resource(state, req):
    raise Refused("not_found", "no %s %s" % (req["kind"], req["resource_id"]))


OPS = {name[3:]: f for name, f in globals().items() if name.startswith("op_")}


def answer(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_CLOUD_STATE")
    if not path:
        sys.exit("example_cloud.py: give the state file as argument or $EXAMPLE_CLOUD_STATE")
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "hello":
            if req.get("version") != VERSION:
                answer(out, {"ok": False, "error": {
                    "kind": "invalid", "message": "only version %d is spoken" % VERSION}})
                continue
            answer(out, {"ok": True, "version": VERSION, "capabilities": {
                "skip_nodescan": True, "console_log": True,
                "floating_ips": False, "ports": False}})
            continue
        rid = req.get("id")
        op = OPS.get(req.get("op"))
        try:
            if op is None:
                raise Refused("unsupported", "unknown op %r" % req.get("op"))
            with State(path) as state:
                result = op(state, req)
            answer(out, {"id": rid, "ok": True, "result": result})
        except Refused as e:
            answer(out, {"id": rid, "ok": False,
                         "error": {"kind": e.kind, "message": str(e)}})
        except Exception as e:  # a bug here must not kill the cloud
            answer(out, {"id": rid, "ok": False,
                         "error": {"kind": "other", "message": repr(e)}})


if __name__ == "__main__":
    main()
