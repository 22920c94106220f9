"""The seed's textbook select() echo loop: one list for listener and clients, blocking I/O.

Kept deliberately naive (it is the baseline the issue argues about); the only change is
that a reset connection is dropped instead of crashing the whole server. select() cannot
watch descriptors >= FD_SETSIZE (1024), so this server tops out at ~1000 connections.
"""

import select
import socket

from bench.peers import port_from_argv


def serve(port: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    sockets = [listener]
    while True:
        readable, _, _ = select.select(sockets, [], [])
        for sock in readable:
            if sock is listener:
                conn, _ = listener.accept()
                sockets.append(conn)
                continue
            try:
                data = sock.recv(1024)
                if data:
                    sock.send(data)
                    continue
            except OSError:
                pass
            sockets.remove(sock)
            sock.close()


if __name__ == "__main__":
    serve(port_from_argv())
