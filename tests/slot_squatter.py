"""One abusive client of muxd's metrics endpoint, from one source address, in a
process of its own (so that its work cannot stall the test's scraper: one GIL).

``python tests/slot_squatter.py PORT SOURCE MODE`` attacks 127.0.0.1:PORT from
SOURCE until its standard input closes (or ``MAX_SECONDS``), then prints what
it did as one JSON object. Every connection it opens sends an unfinished
request (a request line and a header, never the blank line that ends the
head), so the endpoint waits for the rest until its timeout. MODE is:

* ``hold``: keep ``HELD`` connections (the endpoint's 8 places) open; each one
  muxd ends (its timeout, or anything else) is opened again at once, at most
  ``HOLD_OPENS_PER_SECOND`` a second (the issue's attack: about 3 a second
  against the old endpoint, whose every place it held);
* ``churn``: open ``CHURN_PER_SECOND`` connections a second and close each
  after ``CHURN_LIFE`` seconds (or when muxd ends it first), so that fresh
  unfinished requests arrive all the time and about 50 are open at once.

It prints ``ready`` on a line of its own once its first connections are in
place (hold: ``HELD`` connected and their requests sent; churn: after
``CHURN_LIFE`` seconds of it), so the test scrapes only under the attack.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import sys
import time

HELD = 8
HOLD_OPENS_PER_SECOND = 10.0
CHURN_PER_SECOND = 100.0
CHURN_LIFE = 0.5
MAX_SECONDS = 120.0
UNFINISHED = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"


def main() -> None:
    port, source, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert mode in ("hold", "churn"), mode
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    opened_at: dict[socket.socket, float] = {}
    stats = {"opened": 0, "connected": 0, "ended_by_server": 0, "closed_by_us": 0,
             "failed": 0, "answered": 0}
    began = time.monotonic()
    tokens, refilled = float(HELD), began
    ready = False

    def open_one(now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            stats["failed"] += 1
            sock.close()
            return
        stats["opened"] += 1
        opened_at[sock] = now
        selector.register(sock, selectors.EVENT_WRITE)

    def drop(sock: socket.socket, why: str) -> None:
        stats[why] += 1
        selector.unregister(sock)
        del opened_at[sock]
        sock.close()

    while time.monotonic() - began < MAX_SECONDS:
        now = time.monotonic()
        if mode == "hold":
            tokens = min(float(HELD), tokens + (now - refilled) * HOLD_OPENS_PER_SECOND)
            refilled = now
            while len(opened_at) < HELD and tokens >= 1:
                tokens -= 1
                open_one(now)
            if not ready and stats["connected"] >= HELD:
                ready = True
                print("ready", flush=True)
        else:
            for _ in range(min(64, int((now - began) * CHURN_PER_SECOND) - stats["opened"]
                               - stats["failed"])):
                open_one(now)
            for sock in [s for s, at in opened_at.items() if now - at >= CHURN_LIFE]:
                drop(sock, "closed_by_us")
            if not ready and now - began >= CHURN_LIFE:
                ready = True
                print("ready", flush=True)
        stop = False
        for key, mask in selector.select(0.01):
            if key.fileobj is sys.stdin:
                stop = not sys.stdin.buffer.raw.read(4096)  # type: ignore[attr-defined]
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if mask & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    drop(sock, "failed")
                    continue
                stats["connected"] += 1
                try:
                    sock.send(UNFINISHED)
                except OSError:
                    drop(sock, "ended_by_server")
                    continue
                selector.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                stats["answered"] += 1  # an unfinished request is never answered 200
            drop(sock, "ended_by_server")
        if stop:
            break
    for sock in list(opened_at):
        drop(sock, "closed_by_us")
    stats["seconds"] = round(time.monotonic() - began, 2)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
