#!/usr/bin/env python3
"""The example function: answers every request with a greeting.

Like a Knative user container, it listens on the port in $PORT. It needs nothing beyond
Python's standard library.
"""
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The handler's default output is unbuffered, so the head and the body leave in two
    # TCP segments. On a kept-alive connection (the queue-proxy keeps its upstream ones
    # alive) Nagle then holds the body until the head is ACKed, and the receiver delays
    # that ACK by up to 40 ms: every warm request paid it. Buffer the response so it leaves
    # in one write (the server flushes after each request), and send small segments at once
    # should a handler ever write in pieces.
    wbufsize = -1
    disable_nagle_algorithm = True

    def do_GET(self):
        body = (os.environ.get("GREETING", "Hello") + " from Thaw!\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        # One line per request would drown the activator's own log.
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Hello).serve_forever()
