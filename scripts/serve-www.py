#!/usr/bin/env python3
"""Serves a folder over HTTP on 127.0.0.1 as python's http.server does, with the headers that
make the page cross-origin isolated (Cross-Origin-Opener-Policy: same-origin and
Cross-Origin-Embedder-Policy: require-corp), which browsers require before they give a page
SharedArrayBuffer and so the threaded wasm build. `--no-isolation` leaves them out (the tests
check the single-threaded fallback and www/isolation-sw.js with it).

Usage: scripts/serve-www.py [--port PORT] [--no-isolation] DIR   (PORT 0: any free port;
the first line printed names it, as http.server's does).
"""
import argparse
import functools
import http.server


class Handler(http.server.SimpleHTTPRequestHandler):
    isolation = True

    def end_headers(self):
        if self.isolation:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--no-isolation", action="store_true")
    parser.add_argument("directory")
    args = parser.parse_args()
    Handler.isolation = not args.no_isolation
    handler = functools.partial(Handler, directory=args.directory)
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        port = server.server_address[1]
        isolated = "cross-origin isolated" if Handler.isolation else "not isolated"
        print(f"Serving HTTP on 127.0.0.1 port {port} ({isolated})", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
