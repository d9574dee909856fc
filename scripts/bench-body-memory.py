"""Peak RSS of the server while 60 connections each send most of a 20 MiB body and hold.

Usage: python3 scripts/bench-body-memory.py target/release/ladic-serve BUDGET_MIB [ROUNDS]
(ORT_DYLIB_PATH set as for `serve`). Prints one JSON line: RSS before and while the
uploads are held, then each sends the rest of its body and reads its answer (how many
got 429, the others 400: zeros are no image), then the peak RSS and the RSS after they
close. Run it with the default budget (256) and with one too large to matter (4000) to
compare. With ROUNDS (default 1) the whole round is repeated on the same server, and
`rss_after_mb` lists the RSS after each: memory the process keeps round after round
shows there.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request

CONNECTIONS = 60
BODY = 20 * 1024 * 1024 - 1
SENT_EACH = 19 * 1024 * 1024
CHUNK = b"\0" * (1 << 20)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) // 1024
    return 0


def wait_ready(base):
    for _ in range(600):
        try:
            if urllib.request.urlopen(base + "/health/ready", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.1)
    sys.exit("the server did not become ready")


def one_round(server, port):
    """Sends the uploads, holds them, finishes them: (held RSS, answered, refused)."""
    head = (
        "POST /caption?timeout_ms=120000 HTTP/1.1\r\nhost: x\r\n"
        f"content-type: image/png\r\ncontent-length: {BODY}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        s.setblocking(False)
        socks.append(s)
    sent = [0] * CONNECTIONS
    deadline = time.time() + 60
    while time.time() < deadline and any(n < SENT_EACH for n in sent):
        for i, s in enumerate(socks):
            if sent[i] >= SENT_EACH:
                continue
            try:
                sent[i] += s.send(CHUNK)
            except BlockingIOError:
                pass
            except OSError:
                sent[i] = BODY  # answered and closed: nothing more to send
        time.sleep(0.001)
    time.sleep(2)
    held = rss_mb(server.pid, "VmRSS")
    refused = answered = 0
    for i, s in enumerate(socks):
        s.setblocking(True)
        s.settimeout(60)
        try:
            s.sendall(b"\0" * (BODY - sent[i]))
            answer = s.recv(4096)
            answered += answer.startswith(b"HTTP/1.1 ")
            refused += answer.startswith(b"HTTP/1.1 429")
        except OSError:
            pass
    for s in socks:
        s.close()
    time.sleep(2)
    return held, answered, refused


def main():
    binary, budget = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    port = free_port()
    server = subprocess.Popen(
        [binary, "serve", "--bind", f"127.0.0.1:{port}", "--body-memory-mib", budget],
        stderr=subprocess.DEVNULL,
    )
    after = []
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        start = rss_mb(server.pid, "VmRSS")
        for _ in range(rounds):
            held, answered, refused = one_round(server, port)
            after.append(rss_mb(server.pid, "VmRSS"))
        peak = rss_mb(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({
        "body_memory_mib": int(budget),
        "connections": CONNECTIONS,
        "answered": answered,
        "refused_429": refused,
        "rss_start_mb": start,
        "rss_held_mb": held,
        "rss_peak_mb": peak,
        "rss_after_mb": after[0] if rounds == 1 else after,
    }))


if __name__ == "__main__":
    main()
