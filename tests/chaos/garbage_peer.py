"""A Byzantine peer for the chaos suite: it holds a valid node certificate and answers
every request with the next of the given bodies (garbage), status 200.

    python garbage_peer.py HOST PORT CERT KEY BODIES_JSON

BODIES_JSON is a JSON list of strings, served in turn. One connection at a time,
HTTP/1.0 (closed after each answer): enough to make the real nodes parse junk.
"""

from __future__ import annotations

import http.server
import itertools
import json
import ssl
import sys
from pathlib import Path


def main() -> None:
    host, port, cert, key, bodies_file = sys.argv[1:6]
    bodies = itertools.cycle([body.encode() for body in json.loads(Path(bodies_file).read_text())])

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = next(bodies)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer((host, int(port)), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
