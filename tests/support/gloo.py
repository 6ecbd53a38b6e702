"""Spawned torch.distributed ranks for the tests: a free local port, and a runner that collects one
result per rank."""

from __future__ import annotations

import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Callable, world: int = 2) -> dict[int, Any]:
    """Runs worker(rank, world, port, queue) in `world` spawned processes; each puts (rank, result)
    on the queue. Returns {rank: result}; a process that exits non-zero fails the calling test."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=worker, args=(rank, world, port, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return results
