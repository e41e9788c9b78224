#!/usr/bin/env python3
"""How often a retry runs the upstream again once the proxy's cache is full.

Starts the reverse proxy example with its demo upstream and a small entry
bound (`--demo --max-entries 200`), fills the cache with that many distinct
keys (the steady state of a busy service), then sends TRIES new requests,
each followed by the retry of the request first sent LAG new requests
earlier (LAG new requests and LAG retries of other keys lie between an
original and its retry). A retry that is not answered as a replay ran the
upstream a second time. The upstream's own count (GET /executions, passed
through the proxy) confirms it.

Measured on a 2-core machine (release build): on the code before the LRU
change, 2,539 of 3,000 retries (84.6 %) ran again at --lag 20; with it, 0.

    python3 benches/eviction_retry.py                   # builds the example (release)
    python3 benches/eviction_retry.py --binary PATH     # a proxy binary built elsewhere
    python3 benches/eviction_retry.py --tries 3000 --lag 20 --max-entries 200

Loopback only; every loop is bounded; the proxy is stopped on exit.
Only the Python standard library is used.
"""

import argparse
import http.client
import json
import os
import re
import secrets
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"ready: proxy on http://(\S+), admin on http://(\S+),")


def start_proxy(binary, max_entries):
    """Starts the proxy on free loopback ports; answers (process, proxy address)."""
    proxy = subprocess.Popen(
        [
            binary,
            "--demo",
            "--max-entries",
            str(max_entries),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for _ in range(50):
        line = proxy.stdout.readline()
        if not line:
            break
        found = READY.search(line)
        if found:
            return proxy, found.group(1)
    proxy.kill()
    sys.exit("the proxy did not report ready")


class Client:
    """One keep-alive connection to the proxy."""

    def __init__(self, address):
        host, port = address.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def order(self, key):
        """POSTs an order with `key`; answers whether it was a replay."""
        body = json.dumps({"item": key})
        self.connection.request(
            "POST",
            "/orders",
            body=body,
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        )
        response = self.connection.getresponse()
        response.read()
        if response.status != 201:
            sys.exit(f"unexpected status {response.status} for key {key}")
        return response.getheader("idempotent-replayed") == "true"

    def executions(self):
        self.connection.request("GET", "/executions")
        response = self.connection.getresponse()
        return json.loads(response.read())["executions"]


def build():
    print("building examples/reverse_proxy (release)...", file=sys.stderr)
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--example", "reverse_proxy"],
        cwd=ROOT,
        check=True,
    )
    return os.path.join(ROOT, "target", "release", "examples", "reverse_proxy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", help="reverse_proxy binary (default: build it)")
    parser.add_argument("--max-entries", type=int, default=200)
    parser.add_argument("--lag", type=int, default=20, help="new requests between an original and its retry")
    parser.add_argument("--tries", type=int, default=3000, help="retries measured")
    args = parser.parse_args()
    if not 0 < args.lag < 100_000 or not 0 < args.tries <= 1_000_000:
        sys.exit("--lag and --tries must be positive (and bounded)")

    binary = args.binary or build()
    proxy, address = start_proxy(binary, args.max_entries)
    try:
        client = Client(address)
        run = secrets.token_hex(4)
        keys = []

        def fresh():
            key = f"{run}-{len(keys)}"
            keys.append(key)
            if client.order(key):
                sys.exit(f"a new key {key} was answered as a replay")

        for _ in range(args.max_entries):
            fresh()
        ran_again = 0
        for _ in range(args.tries):
            fresh()
            if not client.order(keys[-1 - args.lag]):
                ran_again += 1
        executions = client.executions()
        extra = executions - len(keys)
        percent = 100.0 * ran_again / args.tries
        print(
            f"max_entries={args.max_entries} lag={args.lag}: "
            f"{ran_again} of {args.tries} retries ran the upstream again ({percent:.1f} %); "
            f"upstream ran {executions} times for {len(keys)} distinct keys (+{extra})"
        )
    finally:
        proxy.terminate()
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


if __name__ == "__main__":
    main()
