"""The asyncio Protocol echo server, run on uvloop (libuv) instead of the stdlib loop."""

from bench.peers.asyncio_protocol import main

if __name__ == "__main__":
    main(use_uvloop=True)
