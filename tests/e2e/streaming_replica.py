"""A replica that streams (server-sent events, as chat completions do), for the gateway's streaming test:
three events a quarter of a second apart, each stamped with when it was sent.

    uvicorn tests.e2e.streaming_replica:app --port P
"""

import asyncio
import json
import time


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/healthz":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for index in range(3):
        event = {"index": index, "sent": time.time()}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.25)
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
