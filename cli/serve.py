"""``likeness serve``: the API (uvicorn, in this process) and one worker subprocess.

The worker runs in its own session, so a Ctrl-C in the terminal reaches only
this process; we then stop the API and send the worker one SIGTERM, which
finishes its current batch and exits (see ``worker.process``). A second Ctrl-C
while waiting kills the worker; its jobs run again once their leases expire.
The worker also stops on its own when this process disappears.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from rich.console import Console

from likeness.settings import get_settings

err = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_WORKER_DIED = 1


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--parent-pid", str(os.getpid())],
        env=env,
        start_new_session=True,  # terminal signals go to us; we decide what the worker gets
    )


def stop_worker(worker: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait for the batch to finish; a further Ctrl-C kills it."""
    if worker.poll() is not None:
        return worker.returncode
    err.print(
        f"stopping the worker (pid {worker.pid}) after its current batch; Ctrl-C again to kill it"
    )
    worker.terminate()
    previous = signal.signal(signal.SIGINT, lambda s, f: worker.kill())
    try:
        return worker.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def serve(host: str, port: int) -> int:
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The worker must use exactly our store, whatever its environment would default to.
    env = {
        **os.environ,
        "LIKENESS_STORE": settings.store,
        "LIKENESS_DATA_DIR": str(settings.data_dir),
    }
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port))
    stopping, worker_died = threading.Event(), threading.Event()

    def watch(worker: subprocess.Popen[bytes]) -> None:
        worker.wait()
        if not stopping.is_set():  # it exited before we asked: no point taking jobs
            worker_died.set()
            server.should_exit = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # uvicorn handles signals while it serves and re-raises them once it has shut
        # down; this keeps that re-raise from killing us before the worker is stopped.
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    worker = start_worker(env)
    threading.Thread(target=watch, args=(worker,), daemon=True).start()
    print(
        f"likeness: serving http://{host}:{port} (API docs at /docs); jobs in "
        f"{settings.store}; worker pid {worker.pid}; Ctrl-C stops both",
        flush=True,
    )
    code = 0
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind the port
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        stopping.set()
        worker_code = stop_worker(worker)
    if worker_died.is_set():
        err.print(
            f"[bold red]error:[/] the worker exited with code {worker_code}; see its messages above"
        )
        return EXIT_WORKER_DIED
    return code
