"""A job's code as users ship it: a zip on an HTTP server, here a loopback ``http.server``.

``code_zip`` writes a zip whose one top-level folder (as a GitHub archive has) holds a module
``zipped_<token>.py`` (an entrypoint ``train``, an inference handler factory ``serve``) and a
script ``run.py`` (a command) that
imports a helper next to it. Both write ``token`` into the job's checkpoint directory, a
value that exists nowhere but in the zip, so a test sees that the zip's code ran on the
workers and not something the nodes already had.
"""

from __future__ import annotations

import functools
import threading
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_MODULE = '''
import json, os
from pathlib import Path

TOKEN = "{token}"


def train(ctx):
    out = Path(ctx.checkpoint_dir) / f"from-zip-{{ctx.rank}}.json"
    out.write_text(json.dumps({{"token": TOKEN, "cwd": os.getcwd()}}))
    ctx.report(progress=0.5, zip_token_length=float(len(TOKEN)))


def serve(ctx):
    def handle(body):
        return TOKEN.encode() + b":" + body
    return handle
'''

_HELPER = 'TOKEN = "{token}"\n'

_SCRIPT = '''
import json, os
from pathlib import Path

import helper_{token}

out = Path(os.environ["AIFACTORY_CHECKPOINT_DIR"]) / f"from-command-{{os.environ['RANK']}}.json"
out.write_text(json.dumps({{"token": helper_{token}.TOKEN, "cwd": os.getcwd()}}))
print("AIFACTORY_REPORT " + json.dumps({{"progress": 1.0}}), flush=True)
'''


@dataclass(frozen=True, slots=True)
class CodeZip:
    """A zip served at ``url``: ``module:train`` is its entrypoint, ``run.py`` its command."""

    url: str
    token: str

    @property
    def entrypoint(self) -> str:
        return f"zipped_{self.token}:train"

    @property
    def handler(self) -> str:
        return f"zipped_{self.token}:serve"


def code_zip(folder: Path, base_url: str) -> CodeZip:
    token = uuid.uuid4().hex[:12]
    name = f"code-{token}.zip"
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr(f"job-{token}/zipped_{token}.py", _MODULE.format(token=token))
        archive.writestr(f"job-{token}/helper_{token}.py", _HELPER.format(token=token))
        archive.writestr(f"job-{token}/run.py", _SCRIPT.format(token=token))
    return CodeZip(url=f"{base_url}/{name}", token=token)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True, name="code-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
