"""With real processes: a worker killed with SIGKILL mid-job, a worker stopped with
SIGTERM mid-batch, and a job canceled mid-search."""

from __future__ import annotations

import signal
from collections.abc import Callable

from likeness.jobs import JobStatus
from tests.service.helpers import Service, get_job, png, png_size, submit, wait_final, wait_until

# Slow enough steps (16 restarts per job) that a test can act while a search runs.
SLOW = [("steps", "20"), ("restarts", "16")]


def test_kill_9_mid_job_then_a_new_worker_completes_every_job_once_even_on_sigterm(
    make_service: Callable[[str], Service],
) -> None:
    service = make_service("sqlite")
    client = service.client()
    ids = [submit(client, png(8, i), [*SLOW, ("seed", str(i))]) for i in range(3)]
    # Short leases, so the dead worker's jobs are claimable again within seconds.
    first = service.start_worker(lease_seconds=2)
    first_id = first.worker_id()

    def mid_job() -> bool:
        job = get_job(client, ids[0])
        return job["status"] == "running" and 1 <= job["progress"]["step"] < 20

    wait_until(mid_job, timeout=60, what="the jobs to be mid-search", logs=service.logs)
    first.popen.kill()  # SIGKILL: no clean-up of any kind
    assert first.wait(10) == -signal.SIGKILL
    store = client.app.state.store
    for job_id in ids:
        rec = store.get(job_id)
        assert rec.status is JobStatus.RUNNING and rec.lease_owner == first_id, rec

    second = service.start_worker(lease_seconds=2)
    second_id = second.worker_id()
    wait_until(
        lambda: mid_job() and store.get(ids[0]).lease_owner == second_id,
        timeout=60,
        what="the second worker to be mid-search",
        logs=service.logs,
    )
    second.signal(signal.SIGTERM)  # a clean stop finishes the batch in hand, then exits 0
    assert second.wait(60) == 0, second.log()
    final = wait_final(client, ids, timeout=5, logs=service.logs)
    for job_id in ids:
        job = final[job_id]
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert job["result"]["worker"] == second_id and job["result"]["attempt"] == 2
        assert png_size(client.get(f"/jobs/{job_id}/result").content) == (32, 32)
        # The dead worker's lease is gone: a late finish from it could change nothing.
        assert not store.finish(job_id, first_id, JobStatus.SUCCEEDED, result={"dup": True})
        assert get_job(client, job_id) == job
    counts = store.counts_by_status()
    assert counts[JobStatus.SUCCEEDED] == 3 and sum(counts.values()) == 3


def test_cancel_a_running_job_stops_it_within_a_step_and_its_batch_goes_on(
    make_service: Callable[[str], Service],
) -> None:
    service = make_service("sqlite")
    client = service.client()
    ids = [submit(client, png(8, i), SLOW) for i in range(2)]
    victim, other = ids
    # Progress on every step, so the cancel response tells exactly how far the search was.
    worker = service.start_worker(progress_interval_seconds=0)
    wait_until(
        lambda: get_job(client, victim)["progress"]["step"] >= 2,
        timeout=60,
        what="the search to be under way",
        logs=service.logs,
    )
    r = client.post(f"/jobs/{victim}/cancel")
    assert r.status_code == 200, r.text
    step_at_cancel = r.json()["progress"]["step"]
    assert r.json()["status"] == "running" and r.json()["cancel_requested"]

    canceled = wait_until(
        lambda: (job := get_job(client, victim))["status"] == "canceled" and job,
        timeout=10,
        what="the canceled job to stop",
        logs=service.logs,
    )
    # The step in flight when the cancel landed may finish; the check after it stops the job.
    assert canceled["progress"]["step"] <= step_at_cancel + 2, canceled
    assert canceled["result"] is None and canceled["error"] is None
    assert client.get(f"/jobs/{victim}/result").json()["code"] == "no_result"
    # Its batch mate was still searching when it was let go, and then finished normally.
    assert get_job(client, other)["status"] == "running"
    done = wait_final(client, [other], timeout=60, logs=service.logs)[other]
    assert done["status"] == "succeeded" and done["progress"]["step"] == 20
    assert done["result"]["batch_size"] == 2
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
