"""A small real server for the process driver's replica tests (tests/agent/test_replicas.py), standard
library only, so those tests need no model: it listens where the agent says (``--port``), answers its
health route 503 ("loading") for ``--ready-after`` seconds (forever with ``--never-ready``) and 200
after, and writes what it was started with (its arguments, its environment) to ``started.json`` in its
working directory.

    python replica_program.py [--ready-after 0.5] [--never-ready] [--health-path /healthz] --port N
"""

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--health-path", default="/healthz")
    args = parser.parse_args()
    ready_at = time.monotonic() + args.ready_after

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            ready = not args.never_ready and time.monotonic() >= ready_at
            status = (200 if ready else 503) if self.path == args.health_path else 404
            body = json.dumps({"status": "ready" if status == 200 else "loading"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *values: object) -> None:  # quiet: the tests read no log
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Health)
    started = Path("started.json.tmp")
    started.write_text(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "environment": dict(os.environ)}))
    started.rename("started.json")
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
