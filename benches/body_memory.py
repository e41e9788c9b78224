#!/usr/bin/env python3
"""Resident memory of the reverse proxy while it buffers bodies sent one byte
per chunk.

Starts the reverse proxy example with its demo upstream, then opens
CONNECTIONS connections at once and sends on each a protected POST whose
body (BODY bytes, 1 MiB by default: the default limit) comes as one-byte
HTTP/1.1 chunks. Every body is sent but for its last chunk, so the proxy
holds all of them at once; then the bodies are ended and the answers read.
Prints the proxy's resident memory (VmRSS) before, while the bodies are
held, and its peak (VmHWM), from /proc (Linux).

Measured on a 2-core machine (release build): ten bodies grew the peak by
392 MB on the code that kept one handle per frame, by 12 MB with the
gathered copy (twenty: 782 MB, 30 MB).

    python3 benches/body_memory.py                      # builds the example (release)
    python3 benches/body_memory.py --binary PATH --connections 20

Loopback only; every loop is bounded; the proxy is stopped on exit.
Only the Python standard library is used.
"""

import argparse
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY = re.compile(r"ready: proxy on http://(\S+), admin on http://(\S+),")


def start_proxy(binary):
    proxy = subprocess.Popen(
        [binary, "--demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
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
            host, port = found.group(1).rsplit(":", 1)
            return proxy, (host, int(port))
    proxy.kill()
    sys.exit("the proxy did not report ready")


def memory_kb(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def mb(kb):
    return f"{kb / 1000:.1f} MB"


class Upload(threading.Thread):
    """One connection: the head and all but the last chunk, then, when told,
    the end of the body and the answer."""

    def __init__(self, address, size, run, index, sent, finish):
        super().__init__(daemon=True)
        self.address, self.size = address, size
        self.key = f"{run}-{index}"
        self.sent, self.finish = sent, finish
        self.status = None
        self.error = None

    def run(self):
        try:
            with socket.create_connection(self.address, timeout=120) as conn:
                head = (
                    "POST /orders HTTP/1.1\r\nHost: proxy\r\n"
                    f"Idempotency-Key: {self.key}\r\n"
                    "Content-Type: application/octet-stream\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                )
                conn.sendall(head.encode() + b"1\r\nx\r\n" * self.size)
                self.sent.wait()
                self.finish.wait(timeout=300)
                conn.sendall(b"0\r\n\r\n")
                answer = b""
                while b"\r\n" not in answer and len(answer) < 65536:
                    data = conn.recv(4096)
                    if not data:
                        break
                    answer += data
                self.status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
        except Exception as error:  # reported by main
            self.error = error
            self.sent.abort()


def build():
    print("building examples/reverse_proxy (release)...", file=sys.stderr)
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--example", "reverse_proxy"],
        cwd=ROOT,
        check=True,
    )
    return os.path.join(ROOT, "target", "release", "examples", "reverse_proxy")


def settle(pid, limit_s=60.0):
    """Waits until the proxy's RSS stops growing (it has read what was sent);
    answers the RSS."""
    last, steady = memory_kb(pid, "VmRSS"), 0
    deadline = time.monotonic() + limit_s
    while steady < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = memory_kb(pid, "VmRSS")
        steady = steady + 1 if abs(now - last) < 256 else 0
        last = now
    return last


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", help="reverse_proxy binary (default: build it)")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--body", type=int, default=1 << 20, help="body bytes per request")
    args = parser.parse_args()
    if not 0 < args.connections <= 200 or not 0 < args.body <= 16 << 20:
        sys.exit("--connections in 1..=200 and --body in 1..=16 MiB")

    binary = args.binary or build()
    proxy, address = start_proxy(binary)
    try:
        pid = proxy.pid
        time.sleep(0.5)
        before = memory_kb(pid, "VmRSS")
        run = secrets.token_hex(4)
        sent = threading.Barrier(args.connections + 1)
        finish = threading.Event()
        uploads = [Upload(address, args.body, run, i, sent, finish) for i in range(args.connections)]
        for upload in uploads:
            upload.start()
        try:
            sent.wait(timeout=300)
        except threading.BrokenBarrierError:
            pass
        held = settle(pid)
        finish.set()
        for upload in uploads:
            upload.join(timeout=300)
        failed = [u for u in uploads if u.error or not (u.status or "").startswith("HTTP/1.1 201")]
        peak = memory_kb(pid, "VmHWM")
        after = memory_kb(pid, "VmRSS")
        print(
            f"{args.connections} concurrent bodies of {args.body} bytes in one-byte chunks: "
            f"RSS before {mb(before)}, while held {mb(held)}, peak {mb(peak)} "
            f"(+{mb(peak - before)}), after {mb(after)}"
        )
        if failed:
            for upload in failed:
                print(f"  {upload.key}: {upload.error or upload.status}", file=sys.stderr)
            sys.exit(f"{len(failed)} of {args.connections} uploads failed")
    finally:
        proxy.terminate()
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


if __name__ == "__main__":
    main()
