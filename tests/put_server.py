"""A static file server that also accepts PUT: what `smalti ledger publish --to http://...` writes to, and
what tlog clients then read from. Run as ``python tests/put_server.py PORT FOLDER``."""

import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Handler(SimpleHTTPRequestHandler):
    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        root = Path(self.directory).resolve()
        target = (root / self.path.split("?")[0].lstrip("/")).resolve()
        if root not in target.parents:
            self.send_error(403, "outside the served folder")
            return
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".upload")
        temporary.write_bytes(data)
        temporary.replace(target)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    port, folder = int(sys.argv[1]), sys.argv[2]
    ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=folder)).serve_forever()
