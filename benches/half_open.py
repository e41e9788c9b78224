#!/usr/bin/env python3
"""How many half-open connections the reverse proxy still holds after its
header read timeout plus two seconds.

Each connection sends `POST /x HTTP/1.1` and a Host line, then nothing (the
measurement of issue 15, which found all 2,000 still open after 35 s).
Loopback only; the whole run is bounded by --budget seconds.

    python3 benches/half_open.py                      # 2,000 connections, default 10 s timeout
    python3 benches/half_open.py --connections 500 --header-read-timeout 2

It builds the proxy first (`cargo build --release --example reverse_proxy`),
or runs the one --binary names.

It raises its own open-file limit (the proxy, its child, inherits it) when
the soft limit is too low for the connections asked for.
"""

import argparse
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import urllib.request

HEAD = b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def build(root):
    subprocess.run(
        ["cargo", "build", "--release", "--example", "reverse_proxy"], cwd=root, check=True
    )
    return os.path.join(root, "target", "release", "examples", "reverse_proxy")


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            sys.exit(f"open-file limit {hard} is below the {needed} needed; raise `ulimit -Hn`")


def start_proxy(path, args, budget):
    proxy = subprocess.Popen(
        [path, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proxy.stdout], [], [], 1)
        if ready:
            line = proxy.stdout.readline().decode()
            if line.startswith("ready:"):
                url = line.split("proxy on ")[1].split(",")[0]
                admin = line.split("admin on ")[1].split(",")[0]
                return proxy, url, admin
            if not line:
                break
    proxy.kill()
    sys.exit("the proxy did not report ready")


def still_open(sock):
    """True while the proxy has neither closed nor reset the connection."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return False
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            return False
        raise


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--header-read-timeout",
        type=float,
        default=None,
        help="passed to the proxy (default: the proxy's own, 10 s)",
    )
    parser.add_argument("--budget", type=float, default=120, help="bound on the whole run, seconds")
    parser.add_argument("--binary", help="the proxy to run (default: build it in release mode)")
    args = parser.parse_args()
    timeout = args.header_read_timeout if args.header_read_timeout is not None else 10.0
    if timeout + 30 > args.budget:
        sys.exit("--budget must exceed the header timeout by 30 s")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = args.binary or build(root)
    started = time.monotonic()
    raise_fd_limit(2 * args.connections + 256)
    proxy_args = []
    if args.header_read_timeout is not None:
        proxy_args = ["--header-read-timeout", str(args.header_read_timeout)]
    proxy, url, admin = start_proxy(path, proxy_args, 30)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        sockets = []
        for _ in range(args.connections):
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(HEAD)
            sockets.append(sock)
        last_opened = time.monotonic()
        print(f"{len(sockets)} half-open connections opened in {last_opened - started:.1f} s")

        request = urllib.request.Request(f"{url}/orders", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            print(f"a normal request meanwhile: {response.status}")

        wait_until = last_opened + timeout + 2
        time.sleep(max(0.0, wait_until - time.monotonic()))
        held = sum(1 for sock in sockets if still_open(sock))
        with urllib.request.urlopen(f"{admin}/stats", timeout=10) as response:
            stats = json.load(response)
        print(
            f"still open {timeout:g} s + 2 s after the last one opened: "
            f"{held} of {len(sockets)}"
        )
        print(
            f"proxy /stats: header_timeouts {stats['header_timeouts']}, "
            f"connections {stats['connections']}"
        )
        for sock in sockets:
            sock.close()
    finally:
        proxy.kill()
        proxy.wait(timeout=10)
    if time.monotonic() - started > args.budget:
        sys.exit("the run went past its budget")


if __name__ == "__main__":
    main()
