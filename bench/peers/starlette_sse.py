"""Peer: a minimal sse-starlette + uvicorn fan-out endpoint (the pattern of sse-starlette's README).

GET /bench/_streams/all streams every published event; POST /bench publishes a JSON
object (or each element of an array). One asyncio.Queue per client, as the docs show.
Run: uvicorn bench.peers.starlette_sse:app --host 127.0.0.1 --port 8001
"""

import asyncio
import json

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

subscribers: set[asyncio.Queue] = set()


async def stream(request):
    queue: asyncio.Queue = asyncio.Queue()
    subscribers.add(queue)

    async def events():
        try:
            yield {"comment": "connected"}
            while True:
                yield {"event": "change", "data": await queue.get()}
        finally:
            subscribers.discard(queue)

    return EventSourceResponse(events(), ping=15)


async def publish(request):
    body = json.loads(await request.body())
    for item in body if isinstance(body, list) else [body]:
        data = json.dumps(item)
        for queue in subscribers:
            queue.put_nowait(data)
    return Response(status_code=201)


app = Starlette(routes=[Route("/bench/_streams/all", stream), Route("/bench", publish, methods=["POST"])])
