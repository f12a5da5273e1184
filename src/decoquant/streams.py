"""Work done off the critical path: on a worker thread, on a side CUDA stream, after the main stream's work
that produced its inputs.

The cache uses it to compress a prefill's blocks layer by layer while the model goes on. Compression syncs
with the GPU twice (`torch.linalg.eigh` checks its result; whether a row must stay exact). On the thread that
runs the model, each sync would drain the queue of launched work and leave the GPU idle while the host
launches the next layer; on a worker thread the syncs block only the worker.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

_SIDE: dict[torch.device, "torch.cuda.Stream"] = {}
_WORKER: ThreadPoolExecutor | None = None


def mark(device: torch.device) -> "torch.cuda.Event | None":
    """An event on the current stream of `device` (None off CUDA or while a CUDA graph is captured: the
    work then runs in order, where it was asked for)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class Job:
    """Work started by `launch`; `wait()` returns once it is done and orders the calling thread's current
    stream after its GPU work (re-raising what the work raised)."""

    def __init__(self, future: Future | None, device: torch.device | None):
        self._future, self._device = future, device

    def wait(self) -> None:
        if self._future is None:
            return
        future, self._future = self._future, None
        done = future.result()
        torch.cuda.current_stream(self._device).wait_event(done)


def launch(fn: Callable[[], None], event: "torch.cuda.Event | None", device: torch.device,
           reads: tuple[torch.Tensor, ...] = ()) -> Job:
    """Run `fn` on the worker thread with a side stream of `device` current, after the main stream's work up
    to `event` (from `mark`); jobs run one at a time, in launch order. `reads`: tensors of the main stream
    that `fn` reads (their memory is not reused before the side stream is done with them). With event None,
    `fn` runs now, on the calling thread."""
    global _WORKER
    if event is None:
        fn()
        return Job(None, None)
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    side = _SIDE.get(device)
    if side is None:
        # high priority: its small kernels start as soon as SMs free up, between the model's GEMMs
        side = _SIDE[device] = torch.cuda.Stream(device, priority=-1)
    for t in reads:
        t.record_stream(side)
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decoquant-compress")

    def run() -> "torch.cuda.Event":
        with torch.no_grad(), torch.cuda.device(device), torch.cuda.stream(side):
            side.wait_event(event)
            fn()
            done = torch.cuda.Event()
            done.record(side)
        return done

    return Job(_WORKER.submit(run), device)
