"""The floor for a Python echo loop: the least work per message CPython allows.

Not a server anyone should run: no timeouts, no limits, no signals, no
half-close, no backpressure. It exists to answer one question in the same
run as everything else: how much of a Python server's cost per message is
the interpreter's unavoidable share (one ``epoll.poll`` tuple per event, one
``recv_into`` and one ``send`` with their GIL release, a dict lookup), and how
much is the server's own design. muxd's hot path is measured against it.

A short send (never seen with the 1 KiB, one-in-flight scenarios it runs in)
is finished with a blocking ``sendall`` so the load client still verifies
every byte.
"""

import select
import socket

from bench.peers import port_from_argv, raise_nofile_limit


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    buffer = bytearray(256 * 1024)
    view = memoryview(buffer)
    poll, conns_get = poller.poll, conns.get
    while True:
        for fd, _event in poll():
            conn = conns_get(fd)
            if conn is None:
                _accept_all(listener, poller, conns)
                continue
            try:
                received = conn.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                received = 0
            if received:
                try:
                    sent = conn.send(view[:received])
                except OSError:
                    sent = received = 0
                if sent < received:
                    conn.setblocking(True)
                    conn.sendall(view[sent:received])
                    conn.setblocking(False)
                continue
            poller.unregister(fd)
            del conns[fd]
            conn.close()


def _accept_all(listener: socket.socket, poller: select.epoll,
                conns: dict[int, socket.socket]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conns[conn.fileno()] = conn
        poller.register(conn.fileno(), select.EPOLLIN | select.EPOLLET)


def main() -> None:
    raise_nofile_limit()
    serve(port_from_argv())


if __name__ == "__main__":
    main()
