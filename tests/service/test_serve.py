"""``likeness serve`` as a real process (uvicorn + its worker), hit by 20 clients at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    Proc,
    alive,
    png,
    png_size,
    running_serve,
    wait_final,
    wait_until,
)

CLIENTS = 20


@pytest.fixture
def served(tiny_weights: Path, tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    with running_serve(tiny_weights, tmp_path) as served:
        yield served


def test_serve_takes_20_concurrent_clients_then_stops_cleanly_on_ctrl_c(
    served: tuple[Proc, str], tmp_path: Path
) -> None:
    proc, url = served
    banner = wait_until(
        lambda: re.search(r"serving (http://\S+) .*worker pid (\d+)", proc.log()),
        timeout=30,
        what="the serve banner",
        logs=proc.log,
    )
    assert banner.group(1) == url
    worker_pid = int(banner.group(2))

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=30, interval=0.1, what="the API to answer", logs=proc.log)

    barrier = threading.Barrier(CLIENTS)
    answers: list[httpx.Response | Exception] = [ValueError("no answer")] * CLIENTS

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            barrier.wait(timeout=30)  # all 20 submit at the same moment
            try:
                answers[i] = http.post(
                    "/upscale",
                    files={"thumbnail": ("t.png", png(8, i), "image/png")},
                    data={"steps": "3", "restarts": "1"},
                )
            except httpx.HTTPError as exc:
                answers[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(a, httpx.Response) and a.status_code == 202 for a in answers), answers
    ids = [a.json()["id"] for a in answers if isinstance(a, httpx.Response)]
    assert len(set(ids)) == CLIENTS

    with httpx.Client(base_url=url, timeout=10) as http:
        final = wait_final(http, ids, timeout=120, logs=proc.log)
        assert {j["status"] for j in final.values()} == {"succeeded"}, final
        assert png_size(http.get(f"/jobs/{ids[0]}/result").content) == (32, 32)
        assert http.get("/readyz").status_code == 200
        # Claims take up to 8 compatible jobs, so 20 jobs cannot need 20 searches.
        assert len({j["result"]["batch_id"] for j in final.values()}) < CLIENTS

    proc.signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    assert proc.wait(60) == 0, proc.log()
    assert not alive(worker_pid), "the worker outlived serve"
    assert "stopping the worker" in proc.log()


def test_the_cli_serve_and_worker_stats_stay_torch_free() -> None:
    """`likeness --help`, `serve` and the API's /metrics must not pay for importing torch."""
    code = (
        "import sys, cli.main, cli.serve, likeness.worker_stats, app.main; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
