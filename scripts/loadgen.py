#!/usr/bin/env python3
"""A small load generator for ladic-serve (standard library only), used by
scripts/soak.sh. Loopback only: it refuses any other host.

    loadgen.py measure --url http://127.0.0.1:8080 --seconds 15 --concurrency 8
        closed loop; prints the throughput of 200 responses (captions per second)
    loadgen.py run --url ... --rate 20 --seconds 60 --pid 1234 [--rss-limit-mb 1024]
               [--max-growth-mb 32] [--allowed 200,429,503,504] [--json out.json]
        open loop at a fixed arrival rate (the server cannot slow it down, as real
        clients would not wait); samples the server's RSS from /proc/PID/status every
        second; exits 1 on a status outside --allowed, a connection error, RSS over the
        limit, or (with --max-growth-mb) RSS growth between the first and last fifth of
        the run beyond that many MiB.

Each request POSTs a small PNG (a coloured square on grey, one of 16 variants) with
a random seed and the bundle's default parameters unless --query says otherwise.
"""

import argparse
import http.client
import json
import random
import statistics
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor


def png(variant, w=96, h=80):
    """A coloured square on a light background, as an RGB PNG."""
    colour = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 200, 20)][variant % 4]
    x0 = 10 + 5 * (variant // 4)
    rows = []
    for y in range(h):
        row = bytearray([0])
        for x in range(w):
            inside = x0 <= x < x0 + 40 and 15 <= y < 55
            row += bytes(colour if inside else (240, 240, 240))
        rows.append(bytes(row))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


IMAGES = [png(v) for v in range(16)]


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, url, query):
        u = urllib.parse.urlsplit(url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"loadgen: loopback only, not {u.hostname}")
        self.host, self.port = u.hostname, u.port or 80
        self.query = query
        self.local = threading.local()

    def conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=300)
            self.local.conn = c
        return c

    def caption(self):
        """(status or an error name, seconds)."""
        seed = random.getrandbits(63)
        body = random.choice(IMAGES)
        path = f"/caption?seed={seed}" + (f"&{self.query}" if self.query else "")
        start = time.monotonic()
        try:
            c = self.conn()
            c.request("POST", path, body=body, headers={"content-type": "image/png"})
            r = c.getresponse()
            r.read()
            if r.getheader("connection", "").lower() == "close":
                c.close()
                self.local.conn = None
            return r.status, time.monotonic() - start
        except (OSError, http.client.HTTPException) as e:
            self.local.conn = None
            return type(e).__name__, time.monotonic() - start


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Results:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = {}
        self.latencies = []

    def add(self, status, seconds):
        with self.lock:
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if status == 200:
                self.latencies.append(seconds)


def measure(args):
    client = Client(args.url, args.query)
    results = Results()
    end = time.monotonic() + args.seconds

    def loop():
        while time.monotonic() < end:
            results.add(*client.caption())

    start = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    ok = results.statuses.get("200", 0)
    print(
        json.dumps(
            {
                "captions_per_second": ok / elapsed,
                "statuses": results.statuses,
                "p50_s": statistics.median(results.latencies) if results.latencies else None,
            }
        )
    )


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args):
    client = Client(args.url, args.query)
    results = Results()
    allowed = {s.strip() for s in args.allowed.split(",")}
    samples = []  # (seconds since start, RSS KiB)
    stop = threading.Event()
    start = time.monotonic()

    def sample():
        while not stop.is_set():
            kib = rss_kib(args.pid)
            if kib is not None:
                samples.append((time.monotonic() - start, kib))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    submitted = 0
    late = 0
    with ThreadPoolExecutor(max_workers=args.max_in_flight) as pool:
        pending = []
        interval = 1.0 / args.rate
        while True:
            now = time.monotonic() - start
            if now >= args.seconds:
                break
            due = submitted * interval
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            if now - due > 1.0:
                late += 1  # the generator itself cannot keep up
            pending.append(pool.submit(lambda: results.add(*client.caption())))
            submitted += 1
        for f in pending:
            f.result()
    stop.set()
    sampler.join()
    elapsed = time.monotonic() - start

    rss_mib = [k / 1024 for _, k in samples]
    fifth = max(1, len(rss_mib) // 5)
    first = statistics.median(rss_mib[:fifth]) if rss_mib else None
    last = statistics.median(rss_mib[-fifth:]) if rss_mib else None
    report = {
        "seconds": round(elapsed, 1),
        "rate_per_second": args.rate,
        "requests": submitted,
        "generator_late": late,
        "statuses": results.statuses,
        "captions_per_second": round(results.statuses.get("200", 0) / elapsed, 2),
        "latency_200_s": {
            "p50": percentile(results.latencies, 0.5),
            "p99": percentile(results.latencies, 0.99),
            "max": max(results.latencies) if results.latencies else None,
        },
        "rss_mib": {
            "min": min(rss_mib) if rss_mib else None,
            "max": max(rss_mib) if rss_mib else None,
            "first_fifth_median": first,
            "last_fifth_median": last,
            "growth": (last - first) if rss_mib else None,
            "samples": len(rss_mib),
        },
    }
    problems = []
    bad = {s: n for s, n in results.statuses.items() if s not in allowed}
    if bad:
        problems.append(f"statuses outside {sorted(allowed)}: {bad}")
    if args.rss_limit_mb and rss_mib and max(rss_mib) > args.rss_limit_mb:
        problems.append(f"RSS {max(rss_mib):.0f} MiB over the {args.rss_limit_mb} MiB bound")
    if args.max_growth_mb is not None and rss_mib and last - first > args.max_growth_mb:
        problems.append(
            f"RSS grew {last - first:.1f} MiB (first fifth {first:.1f}, last fifth "
            f"{last:.1f}), more than the {args.max_growth_mb} MiB noise allowance"
        )
    if not samples:
        problems.append(f"no RSS samples for pid {args.pid}")
    report["problems"] = problems
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 1 if problems else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("measure", "run"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True)
        s.add_argument("--seconds", type=float, required=True)
        s.add_argument("--query", default="", help="extra query parameters, e.g. steps=10")
    m = sub.choices["measure"]
    m.add_argument("--concurrency", type=int, default=8)
    r = sub.choices["run"]
    r.add_argument("--rate", type=float, required=True, help="requests per second")
    r.add_argument("--pid", type=int, required=True, help="the server's process id")
    r.add_argument("--allowed", default="200,429,503,504")
    r.add_argument("--rss-limit-mb", type=float)
    r.add_argument("--max-growth-mb", type=float)
    r.add_argument("--max-in-flight", type=int, default=256)
    r.add_argument("--json")
    args = p.parse_args()
    if args.command == "measure":
        measure(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
