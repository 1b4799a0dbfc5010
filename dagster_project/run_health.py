"""Runs whose worker died (kill -9, OOM, a lost machine): fail them and free their pool slots.

Dagster frees a dead run's concurrency slots only once the run is marked finished, and its default
run launcher cannot tell that a run worker died. Two pieces close that gap:

- `MonitoredRunLauncher`: the default launcher plus a worker health check, so the daemon's run
  monitoring (enabled in every instance bioembed writes or ships) fails runs whose worker is gone,
  after which `free_slots_after_run_end_seconds` frees their slots;
- `reap_dead_runs`: the same check and clean-up for in-process runs (`bioembed demo`, `run`,
  tests), which have no daemon; `materialize_home` calls it before and while it runs plates.
"""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus  # no public export in Dagster 1.13
from dagster._core.storage.tags import GRPC_INFO_TAG

INSTANCE_SETTINGS = {
    "run_launcher": {"module": "dagster_project.run_health", "class": "MonitoredRunLauncher"},
    "run_monitoring": {"enabled": True, "poll_interval_seconds": 15, "free_slots_after_run_end_seconds": 15},
}
"""What every Dagster instance bioembed writes or ships sets (besides storage and pools)."""

_WATCHED = (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


def _run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The process that started executing the run (it logs RUN_START): the run worker."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
    event = records[0].event_log_entry.dagster_event if records else None
    return event.pid if event is not None else None


def _code_server_has_run(run: dg.DagsterRun) -> bool | None:
    """Whether the code server that launched the run still runs it (None: not launched by one, or unreachable)."""
    from dagster._grpc.client import DagsterGrpcClient
    from dagster._grpc.types import CanCancelExecutionRequest, CanCancelExecutionResult
    from dagster._serdes import deserialize_value

    info = run.tags.get(GRPC_INFO_TAG)
    if not info:
        return None
    where = json.loads(info)
    try:
        client = DagsterGrpcClient(port=where.get("port"), socket=where.get("socket"), host=where.get("host"),
                                   use_ssl=bool(where.get("use_ssl", False)))
        reply = client.can_cancel_execution(CanCancelExecutionRequest(run_id=run.run_id), timeout=10)
        return deserialize_value(reply, CanCancelExecutionResult).can_cancel
    except Exception:  # noqa: BLE001 - a code server that is down or restarted cannot answer
        return None


def worker_alive(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool | None:
    """Is the run's worker process still there? None when it cannot be told (then: leave the run alone).

    Asks the code server that launched it (yes is final); otherwise (in-process runs, a code server that
    restarted or cannot answer) looks for the run worker's process on this machine, started no later
    than the run, so a worker orphaned by a restarted code server is not failed while it still runs.
    """
    server_says = _code_server_has_run(run)
    if server_says:
        return True
    pid = _run_worker_pid(instance, run.run_id)
    if pid is None:
        return server_says
    record = instance.get_run_record_by_id(run.run_id)
    started = record.start_time if record is not None else None
    try:
        process = psutil.Process(pid)
        return started is None or process.create_time() <= started + 1.0  # else: the pid was reused
    except psutil.NoSuchProcess:
        return False


class MonitoredRunLauncher(dg.DefaultRunLauncher):
    """Dagster's default run launcher, with the worker health check run monitoring needs."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        if worker_alive(self._instance, run) is False:
            return CheckRunHealthResult(WorkerStatus.FAILED, "the run worker process is gone (killed or crashed)")
        return CheckRunHealthResult(WorkerStatus.RUNNING)


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail every in-progress run whose worker is gone and free the pool slots finished runs still hold;
    returns the ids of the runs failed."""
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=list(_WATCHED))):
        run = record.dagster_run
        if worker_alive(instance, run) is False:
            instance.report_run_failed(run, "bioembed: the run worker process is gone (killed or crashed); "
                                            "its pool slots are freed")
            failed.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = storage.get_concurrency_run_ids()
        if holders:
            finished = instance.get_run_records(filters=dg.RunsFilter(run_ids=list(holders)))
            for record in finished:
                if record.dagster_run.is_finished:
                    storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
    return failed


@contextmanager
def reaping(instance: dg.DagsterInstance, every_seconds: float = 5.0, log=print) -> Iterator[None]:
    """Reap dead runs now and every `every_seconds` in the background while the block runs
    (so a run waiting on a slot held by a run that dies meanwhile goes on)."""
    stop = threading.Event()

    def reap() -> None:
        for run_id in reap_dead_runs(instance):
            log(f"  run {run_id} had lost its worker process: marked failed, its pool slots freed")

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                reap()
            except Exception as exc:  # noqa: BLE001 - a failed check must not take the runs down
                log(f"  checking for dead runs failed: {type(exc).__name__}: {exc}")

    reap()
    thread = threading.Thread(target=loop, name="bioembed-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
