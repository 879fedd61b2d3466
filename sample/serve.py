"""python -m sample.serve [--ensemble PATH | --cascade FILE | --pretrained DIR] [--port 8800]

Paint with words in the browser: a page on localhost with a canvas whose colours are bound to
phrases of the prompt, every setting of a sampling call, live progress per step with the expert
in use, and the result beside its masks, with downloads that reproduce it with `python -m
sample`. The default model is the shipped paint model (pretrained/paint-shapes, `make
pretrained-paint`). The page talks to a small JSON API over the library (sample/studio.py):

    GET  /api/info              what the model can do (size, samplers, paint, negative, style)
    POST /api/check             a request checked whole, nothing sampled: {ok, plan} or {error}
    POST /api/sample            the same, then queued: {job, plan}
    GET  /api/jobs/ID           {state: queued|running|done|error, progress, error, images}
    GET  /api/jobs/ID/N.png     sample N;  GET /api/jobs/ID/call.zip: PNGs, colors.png,
                                words.json and command.txt

One sampling call runs at a time (the model's devices are shared), the others wait in order.
A bad request is answered 400 with a message the page shows; the server keeps serving.
Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import http.server
import itertools
import json
import os
import queue
import re
import sys
import signal
import threading
import time
import traceback

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGES = {"/": "index.html", "/paint.js": "paint.js", "/paint.css": "paint.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".zip": "application/zip",
         ".json": "application/json"}
DEFAULT_MODEL = os.path.join("pretrained", "paint-shapes")
MAX_BODY = 32 << 20  # a request with a canvas and a style image, base64


class Job:
    def __init__(self, checked, studio):
        self.checked, self.studio = checked, studio
        self.state, self.progress, self.error = "queued", None, None
        self.images: list[bytes] = []
        self.bundle: bytes | None = None
        self.started = self.finished = None

    def view(self) -> dict:
        now = time.time()
        return dict(state=self.state, progress=self.progress, error=self.error,
                    images=len(self.images),
                    seconds=round((self.finished or now) - self.started, 2)
                    if self.started else None)


class Jobs:
    """Sampling calls run one at a time on a worker thread, in the order they came; the last
    KEEP finished calls are kept for their images and downloads."""

    KEEP = 8

    def __init__(self, studio):
        self.studio = studio
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.todo: queue.Queue = queue.Queue()
        self.ids = itertools.count(1)
        threading.Thread(target=self._work, name="sampler", daemon=True).start()

    def submit(self, checked) -> str:
        with self.lock:
            job_id = str(next(self.ids))
            self.jobs[job_id] = Job(checked, self.studio)
            done = [k for k, j in self.jobs.items() if j.state in ("done", "error")]
            for k in done[:-self.KEEP]:
                del self.jobs[k]
        self.todo.put(job_id)
        return job_id

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def _work(self) -> None:
        from sample.studio import encode_png

        while True:
            job = self.get(self.todo.get())
            if job is None:
                continue
            job.state, job.started = "running", time.time()

            def heard(p, job=job):
                job.progress = p

            try:
                images = self.studio.run(job.checked, heard)
                job.images = [encode_png(im) for im in images]
                job.bundle = self.studio.bundle(job.checked.request, images)
                job.state = "done"
            except Exception as e:  # the page shows it; the server keeps serving
                traceback.print_exc()
                job.error, job.state = f"sampling failed: {type(e).__name__}: {e}", "error"
            job.finished = time.time()


def make_handler(studio, jobs: Jobs):
    from ediffi_jax.config import ConfigError
    from sample.studio import RequestError, parse_request

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "ediffi-jax-paint"

        def log_message(self, fmt, *args):  # one short line per API call, none for polling
            if not self.path.startswith("/api/jobs/"):
                sys.stderr.write("%s %s\n" % (self.command, self.path))

        def _send(self, status: int, body: bytes, kind: str, extra=()):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode(), TYPES[".json"])

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path in PAGES:
                name = PAGES[path]
                with open(os.path.join(STATIC, name), "rb") as f:
                    return self._send(200, f.read(), TYPES[os.path.splitext(name)[1]])
            if path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")
            if path == "/api/info":
                return self._json(200, studio.info())
            m = re.fullmatch(r"/api/jobs/(\d+)(?:/(\d+\.png|call\.zip))?", path)
            job = jobs.get(m.group(1)) if m else None
            if job is None:
                return self._json(404, {"error": f"no such page or job: {path}"})
            if m.group(2) is None:
                return self._json(200, job.view())
            if m.group(2) == "call.zip":
                if job.bundle is None:
                    return self._json(409, {"error": "the call has not finished"})
                return self._send(200, job.bundle, TYPES[".zip"],
                                  [("Content-Disposition", f'attachment; filename="call{m.group(1)}.zip"')])
            i = int(m.group(2)[:-4])
            if i >= len(job.images):
                return self._json(404, {"error": f"job {m.group(1)} has {len(job.images)} images"})
            return self._send(200, job.images[i], TYPES[".png"])

        def do_POST(self):
            if self.path not in ("/api/check", "/api/sample"):
                return self._json(404, {"error": f"no such endpoint: {self.path}"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._json(413, {"error": f"request of {length >> 20} MB is over the "
                                                 f"{MAX_BODY >> 20} MB limit (a smaller style image?)"})
            try:
                body = json.loads(self.rfile.read(length) or b"null")
                checked = studio.check(parse_request(body, studio.defaults))
            except json.JSONDecodeError as e:
                return self._json(400, {"error": f"the request is not JSON: {e}"})
            except (RequestError, ConfigError, ValueError) as e:
                return self._json(400, {"error": str(e)})
            except Exception as e:  # a bug, not the user's input: say so, keep serving
                traceback.print_exc()
                return self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
            answer = dict(ok=True, size=list(checked.size), plan=studio.plan_segments(checked),
                          command=studio.command(checked.request))
            if self.path == "/api/sample":
                answer["job"] = jobs.submit(checked)
            return self._json(200, answer)

    return Handler


def make_server(studio, host: str = "127.0.0.1", port: int = 8800):
    """The page's HTTP server (not started); port 0 takes a free one (server.server_port)."""
    server = http.server.ThreadingHTTPServer((host, port), make_handler(studio, Jobs(studio)))
    server.daemon_threads = True
    return server


def load_studio(args):
    from ediffi_jax.config import parse_mesh
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.pretrained import is_pretrained_cascade
    from sample.studio import PretrainedStudio, ProjectStudio

    mesh = make_mesh(parse_mesh(args.mesh))
    if args.pretrained:
        return PretrainedStudio(args.pretrained, dtype=args.dtype, variant=args.variant,
                                mesh=mesh)
    if args.cascade and is_pretrained_cascade(args.cascade):
        return PretrainedStudio(args.cascade, cascade=True, dtype=args.dtype,
                                variant=args.variant, mesh=mesh)
    path = args.cascade or args.ensemble or DEFAULT_MODEL
    if path == DEFAULT_MODEL and not os.path.exists(path):  # started outside the checkout
        path = os.path.join(os.path.dirname(os.path.dirname(STATIC)), DEFAULT_MODEL)
    if not os.path.exists(path):
        hint = (" (make it with `make pretrained-paint`)" if path.endswith(DEFAULT_MODEL)
                else "")
        raise FileNotFoundError(f"{path} does not exist{hint}")
    stages = [n.strip() for n in (args.stages or "").split(",") if n.strip()]
    return ProjectStudio(path, stages, mesh=mesh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sample.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--ensemble", help=f"an ensemble.json, a run's workdir or an export "
                        f"(default: {DEFAULT_MODEL})")
    source.add_argument("--cascade", help="a cascade file (the project's stages, or "
                        "pretrained folders)")
    source.add_argument("--pretrained", help="a local diffusers pipeline folder")
    p.add_argument("--stages", help="comma-separated stage names of --cascade (default: all)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="--pretrained compute dtype")
    p.add_argument("--variant", help="--pretrained weights variant files, e.g. fp16")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor device mesh (write "
                   "--mesh=-1,1,1); each call's batch is sharded over data x fsdp")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8800, help="0: any free port")
    args = p.parse_args(argv)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    from ediffi_jax.config import ConfigError
    from ediffi_jax.encoders.hf import CheckpointError

    try:
        studio = load_studio(args)
        server = make_server(studio, args.host, args.port)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    # Ctrl-C (SIGINT) stops it even when started from a shell's background job, which
    # inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"serving {studio.name} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
