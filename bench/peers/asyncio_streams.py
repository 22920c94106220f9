"""Echo server on asyncio's high-level Streams API (what most tutorials write)."""

import asyncio

from bench.peers import port_from_argv, raise_nofile_limit


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    raise_nofile_limit()
    asyncio.run(serve(port_from_argv()))
