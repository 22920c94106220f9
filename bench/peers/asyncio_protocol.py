"""Echo server on asyncio's low-level Protocol API (uvloop_protocol reuses it on uvloop)."""

import asyncio

from bench.peers import port_from_argv, raise_nofile_limit


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(use_uvloop: bool = False) -> None:
    raise_nofile_limit()
    port = port_from_argv()
    if use_uvloop:
        import uvloop

        uvloop.run(serve(port))
    else:
        asyncio.run(serve(port))


if __name__ == "__main__":
    main()
