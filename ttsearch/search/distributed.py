"""Data-parallel runs on Ray: one driver, N worker actors, each owning a policy Engine and its
verifier (``load_models``) on its own cores, or one GPU each on a GPU machine.

The driver hands out problems a few at a time (fewer as the run nears its end, so a slow
worker does not hold the tail), writes each worker's records to the one results file as
they arrive, and keeps a progress bar over all workers. Records are seeded per problem, so a
line is the one a single-process run writes (timing and pool fields aside; exactly so in
float32). A worker that dies has its unfinished problems requeued to the others: nothing is
lost, nothing written twice. Ray is imported only here, and only when workers are asked for.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable

from tqdm import tqdm

from ttsearch import batch_invariant
from ttsearch.errors import ConfigError, TTSearchError
from ttsearch.eval.datasets import Problem
from ttsearch.search.config import SearchConfig

log = logging.getLogger("ttsearch")

#: calls queued on each worker at once: it starts the next as soon as one returns
CALLS_PER_WORKER = 2


class WorkersLostError(TTSearchError, RuntimeError):
    """Every worker died; what was written stays, and rerunning resumes."""


def import_ray():
    """Ray, or an error that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--workers / --ray-address need Ray, an optional extra: pip install 'ttsearch[ray]'") from exc
    return ray


def check_workers(workers: int | None, ray_address: str | None, threads: int | None = None) -> None:
    """Bad worker settings fail here, before any model loads."""
    for name, value in (("workers", workers), ("worker_threads", threads)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name}={value!r}: expected a positive number of {name.replace('_', ' ')}")
    if threads is not None and workers is None and ray_address is None:
        raise ConfigError("worker_threads: give workers (or a ray_address) too")
    if ray_address is not None and not (isinstance(ray_address, str) and ray_address):
        raise ConfigError(f"ray_address={ray_address!r}: expected host:port or 'auto'")
    if workers is not None or ray_address is not None:
        import_ray()
    if ray_address is not None:
        probe(ray_address)


def probe(address: str) -> None:
    """Fail at once when nothing listens at a host:port address (Ray itself retries for
    minutes before it gives up)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({exc})") from exc


class SearchWorker:
    """One worker: a policy and its verifier, and a method that searches a chunk of problems as one batch."""

    def __init__(self, load_args: dict, threads: int | None, imports: list[str], batch_invariant: bool = False):
        import importlib

        import torch

        from ttsearch.batch_invariant import set_enabled

        set_enabled(batch_invariant)  # the driver's mode, whatever the worker's environment says
        if threads:
            torch.set_num_threads(threads)
        for module in imports:  # strategies and verifiers registered by the user's modules
            importlib.import_module(module)
        from ttsearch.search.load import load_models

        self.policy, self.verifier = load_models(**load_args)

    def describe(self) -> dict:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname()}

    def search(self, items: list[tuple[Problem, SearchConfig]], settings: dict | None) -> list[dict]:
        from ttsearch.search.runner import run_jobs

        records = []
        run_jobs(items, self.policy, self.verifier, on_record=records.append, settings=settings, progress=False)
        return records


def run_on_workers(todo: list[tuple[Problem, SearchConfig]], on_record: Callable[[dict], None], settings: dict | None,
                   load_args: dict, workers: int | None = None, ray_address: str | None = None,
                   imports: list[str] | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Search ``todo`` on Ray workers, handing each record to ``on_record`` once. Starts a
    local Ray instance (``workers`` actors) unless ``ray_address`` names a cluster to join
    (then ``workers`` defaults to one per GPU, else one per CPU). On CPUs each worker gets
    ``threads`` cores (default: an equal share). Returns the workers started and lost, the
    problems requeued and the driver's own seconds per record. Each worker loads its models
    with ``load_models(**load_args)``."""
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            if ray_address is None:
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers or 1), include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=False)
            else:
                ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:
            where = f"the Ray cluster at {ray_address!r}" if ray_address else "a local Ray instance"
            raise ConfigError(f"cannot start or join {where}: {exc}") from exc
        started_here = True
    try:
        return _drive(ray, todo, on_record, settings, load_args, workers, imports or [], progress, threads)
    finally:
        if started_here:
            ray.shutdown()


def _drive(ray, todo, on_record, settings, load_args, workers, imports, progress, threads) -> dict:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = workers or max(1, gpus or cpus)
    if gpus:
        options, threads = {"num_gpus": 1, "num_cpus": 1}, threads
    else:
        threads = threads or max(1, cpus // count)
        options = {"num_cpus": min(threads, cpus)}
    actor = ray.remote(SearchWorker)
    # a worker that dies is not restarted: its problems go to the others
    pool = {i: actor.options(**options, max_restarts=0).remote(load_args, threads, imports, batch_invariant.enabled())
            for i in range(count)}
    for i, info in zip(pool, ray.get([w.describe.remote() for w in pool.values()])):
        log.info("worker %d: pid %d on %s", i, info["pid"], info["host"])

    pending = deque(todo)
    in_flight: dict = {}  # object ref -> (worker, its items)
    lost, requeued = [], 0
    bar = tqdm(total=len(pending), desc=f"{todo[0][1].strategy} on {count} workers", unit="problem",
               disable=not progress)
    start, generated, correct, done = time.perf_counter(), 0, 0, 0

    def hand_out(worker: int) -> None:
        chunk = max(1, min(todo[0][1].problems_in_flight, len(pending) // (CALLS_PER_WORKER * len(pool))))
        items = [pending.popleft() for _ in range(min(chunk, len(pending)))]
        in_flight[pool[worker].search.remote(items, settings)] = (worker, items)

    def fill() -> None:
        for worker in pool:
            while pending and sum(w == worker for w, _ in in_flight.values()) < CALLS_PER_WORKER:
                hand_out(worker)

    fill()
    busy = 0.0  # the driver's own time: receiving, writing and handing out, not waiting
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        woke = time.perf_counter()
        worker, items = in_flight.pop(ref)
        try:
            records = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the worker died (killed, out of memory, node lost)
            pending.extendleft(reversed(items))
            requeued += len(items)
            if worker in pool:
                del pool[worker]
                lost.append(worker)
            log.warning("worker %d died (%s); requeued %s", worker, type(exc).__name__,
                        ", ".join(p.id for p, _ in items))
            if not pool:
                bar.close()
                raise WorkersLostError(f"every worker died; {len(pending)} problems were not searched: rerun the same "
                                       "command to resume") from exc
            fill()
            busy += time.perf_counter() - woke
            continue
        for record in records:
            on_record(record)
            generated += record["tokens_generated"]
            correct += bool(record["selections"]["naive"][str(record["n"])].get("correct"))
            done += 1
            bar.update(1)
        bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - start):.0f}", acc=f"{correct / max(done, 1):.2f}")
        fill()
        busy += time.perf_counter() - woke
    bar.close()
    return {"workers": count, "workers_lost": lost, "requeued": requeued,
            "driver_seconds_per_record": busy / max(done, 1)}
