"""A kazoo client driven line by line over stdin/stdout by the Rust
interop tests (tests/interop_kazoo.rs): it takes kazoo's Lock recipe on the
paths it is told, exactly as Python Nodepool and Zuul do.

Usage: python kazoo_lock_peer.py HOSTS   (HOSTS like 127.0.0.1:2181/chroot)
Commands, one per line; every command prints exactly one line:
  trylock PATH          -> locked | busy        (acquire(blocking=False))
  lock PATH SECONDS     -> locked | timeout     (acquire(timeout=SECONDS))
  release PATH          -> released
  children PATH         -> JSON list of child names
  elect PATH IDENTIFIER -> elected | busy       (Election's lock, non-blocking)
  resign PATH           -> resigned
  contenders PATH       -> JSON list of Election(PATH).contenders()
  quit                  -> bye
"""
import json
import sys

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout
from kazoo.recipe.lock import Lock


def main():
    zk = KazooClient(hosts=sys.argv[1], timeout=10.0)
    zk.start(timeout=15)
    held = {}
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd = parts[0]
        try:
            if cmd == "trylock":
                lock = Lock(zk, parts[1])
                if lock.acquire(blocking=False):
                    held[parts[1]] = lock
                    out = "locked"
                else:
                    out = "busy"
            elif cmd == "lock":
                lock = Lock(zk, parts[1])
                try:
                    lock.acquire(blocking=True, timeout=float(parts[2]))
                    held[parts[1]] = lock
                    out = "locked"
                except LockTimeout:
                    out = "timeout"
            elif cmd == "release":
                held.pop(parts[1]).release()
                out = "released"
            elif cmd == "elect":
                election = zk.Election(parts[1], parts[2])
                if election.lock.acquire(blocking=False):
                    held[parts[1]] = election.lock
                    out = "elected"
                else:
                    out = "busy"
            elif cmd == "resign":
                held.pop(parts[1]).release()
                out = "resigned"
            elif cmd == "contenders":
                out = json.dumps(zk.Election(parts[1]).contenders())
            elif cmd == "children":
                out = json.dumps(sorted(zk.get_children(parts[1])))
            elif cmd == "quit":
                zk.stop()
                zk.close()
                print("bye", flush=True)
                return
            else:
                out = "error unknown command " + cmd
        except Exception as e:  # report, keep serving
            out = "error %s: %s" % (type(e).__name__, e)
        print(out, flush=True)


if __name__ == "__main__":
    main()
