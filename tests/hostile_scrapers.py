"""Hostile scrapers of muxd's metrics endpoint, in a process of their own so
that their load cannot stall the test's own echo probe (one GIL).

``python tests/hostile_scrapers.py PORT TIMEOUT`` runs every bad client at
once, each in a thread, and prints what each saw as one JSON object: garbage
bytes, four 4 MiB headers, a request line without CRLF, an HTTP/0.9
request, 50 pipelined requests, and 500 parallel connections.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from daemon_harness import (  # noqa: E402
    raise_own_nofile,
    raw_exchange,
    recv_until_eof,
    sees_connection_end,
)


def hostile_scrapers(metrics_port: int, request_timeout: float,
                     results: dict[str, object]) -> list[threading.Thread]:
    """Each bad client in a thread of its own; each records what it saw."""
    deadline = request_timeout + 3.0

    def ended_within(sock: socket.socket, name: str) -> None:
        began = time.monotonic()
        results[name] = ("ended" if sees_connection_end(sock, deadline) else "hung",
                         round(time.monotonic() - began, 2))

    def garbage() -> None:
        answer = raw_exchange(metrics_port, os.urandom(3000) + b"\r\n\r\n")
        results["garbage"] = answer[:12].decode(errors="replace")

    def huge_header() -> None:
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=deadline) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20))
                results["huge_header"] = recv_until_eof(sock)[:12].decode(errors="replace")
            except OSError as err:  # a reset after the 400 is fine too
                results["huge_header"] = type(err).__name__

    def no_crlf() -> None:
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=deadline) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1")
            ended_within(sock, "no_crlf")

    def http09() -> None:
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=deadline) as sock:
            sock.sendall(b"GET /metrics\r\n")
            ended_within(sock, "http09")

    def pipelined() -> None:
        answer = raw_exchange(metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
        results["pipelined"] = answer.count(b"HTTP/1.1 200 OK")

    def flood() -> None:
        raise_own_nofile(4096)
        selector = selectors.DefaultSelector()
        socks = []
        for _ in range(500):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", metrics_port))
            selector.register(sock, selectors.EVENT_WRITE)
            socks.append(sock)
        answered = ended = 0
        stop_at = time.monotonic() + deadline + 5
        pending = len(socks)
        while pending and time.monotonic() < stop_at:
            for key, mask in selector.select(0.2):
                sock = key.fileobj
                if mask & selectors.EVENT_WRITE:
                    try:
                        sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    except OSError:
                        pass
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 200"):
                    answered += 1
                if not data or data.startswith(b"HTTP/"):
                    ended += 1
                    pending -= 1
                    selector.unregister(sock)
                    sock.close()
        for sock in socks:
            sock.close()
        results["flood"] = (answered, ended, pending)

    threads = [threading.Thread(target=task, name=task.__name__, daemon=True)
               for task in (garbage, huge_header, no_crlf, http09, pipelined, flood,
                            huge_header, huge_header, huge_header)]
    return threads


def main() -> None:
    port, request_timeout = int(sys.argv[1]), float(sys.argv[2])
    results: dict[str, object] = {}
    threads = hostile_scrapers(port, request_timeout, results)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(request_timeout + 20)
    results["unfinished"] = [thread.name for thread in threads if thread.is_alive()]
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
