"""gunicorn settings for changefeed (used by `make run`, the live tests and the benchmarks).

Read docs/stack-notes.md (sections 1 and 2) before changing anything here: the worker class,
worker_connections, preload, the control socket and the GC thresholds each avoid a trap
that was measured.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from services import config as _settings  # noqa: E402  (pure Python: no pymongo/ssl before patching)

try:
    _conf = _settings.load()
except _settings.ConfigError as _exc:
    print(f"changefeed: bad setting: {_exc}", file=sys.stderr)
    sys.exit(2)

# ---------------------------------------------------------------- metrics
# Every worker writes its Prometheus samples to files in this directory, which GET /metrics
# sums up (services/metrics.py). A fresh one per server, made before any worker imports
# prometheus_client; the master removes it when it exits.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile as _tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _tempfile.mkdtemp(prefix="changefeed-metrics-")
    _OWN_METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"]
else:
    _OWN_METRICS_DIR = None

# ---------------------------------------------------------------- server socket
bind = f"{_conf['HOST']}:{_conf['PORT']}"
backlog = 4096  # many clients reconnect at once after a restart

# ---------------------------------------------------------------- workers
wsgi_app = "app:create_app()"
workers = _conf["WORKERS"]  # each worker runs its own watchers; the embedded engine is shared
worker_class = "worker.Worker"  # pywsgi + gevent-websocket, app answers 401 before any 101
worker_connections = 20000  # the default 1000 counts long-lived streams and then hangs everything
preload_app = False  # the app (and pymongo) must load after gevent patched the worker
timeout = 30  # the worker's notify loop runs in its own greenlet, so long streams are fine
graceful_timeout = 10  # a bound: streams end by the drain hook below, connections close (worker.py)
keepalive = 5
control_socket_disable = True  # gunicorn 27's shared ~/.gunicorn/gunicorn.ctl clashes between instances

# ---------------------------------------------------------------- logging
loglevel = _conf["LOG_LEVEL"]
accesslog = "-"
errorlog = "-"
# %(U)s is the path without the query string: tokens in ?access_token= never reach the log.
# A stream's line (written when it ends) adds its events and bytes (worker.Handler.log_request).
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(L)ss "%(a)s"'
if _conf["LOG_FORMAT"] == "json":  # one JSON object per line, app and access logs alike
    from services.logs import logconfig_dict as _json_logs  # noqa: E402

    logconfig_dict = _json_logs(_conf["LOG_LEVEL"])


# ---------------------------------------------------------------- hooks
def post_worker_init(worker):
    """Tune GC for many connections and end open streams cleanly when the worker stops."""
    import gevent

    from services import memory

    # 10k connections hold ~600k GC-tracked objects; gen-2 collections paused the worker
    # for 150-450 ms (docs/stack-notes.md, section 2). The thresholds remove those pauses;
    # the sweep collects cycles and trims the heap while few streams are open (services/memory.py).
    memory.tune_gc()
    memory.tune_allocator()
    memory.keep_tidy(lambda: _open_streams(worker))
    hub = _hub(worker)
    if hub is not None:
        from services import metrics

        metrics.refresh_forever(hub.refresh_metrics)

    def drain_on_stop():
        drain = getattr(worker, "drain", None)  # worker.Worker: set once it stops accepting
        if drain is not None:
            drain.started.wait()
        else:
            while worker.alive:
                gevent.sleep(0.05)
        hub = _hub(worker)
        if hub is not None:
            hub.close_all("shutdown")

    gevent.spawn(drain_on_stop)


def child_exit(server, worker):
    """A worker that exited (or was killed): its live gauges no longer count. (Not through
    services.metrics: the master makes no samples of its own.)"""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        import shutil

        shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)


def _hub(worker):
    return worker.wsgi.extensions.get("changefeed.hub") if hasattr(worker.wsgi, "extensions") else None


def _open_streams(worker) -> int:
    hub = _hub(worker)
    return sum(len(w.subscribers) for w in hub.watchers.values()) if hub is not None else 0


def on_starting(server):
    """Refuse TLS: streams are written straight to the OS socket (blueprints/transports.py),
    which would bypass it."""
    if server.cfg.is_ssl:
        print(
            "changefeed: refusing to start with certfile/keyfile: it does not terminate TLS; "
            "put a TLS proxy (nginx, Caddy, a load balancer) in front of it",
            file=sys.stderr,
        )
        sys.exit(2)


def when_ready(server):
    server.log.info("changefeed listening on http://%s (%s worker(s))", bind, workers)
