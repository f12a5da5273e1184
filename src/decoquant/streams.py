"""Work queued on a side CUDA stream, after the main stream's work that produced its inputs.

The cache uses it to compress a layer's blocks while the GPU runs the following layers: the host
syncs inside compression (eigh checks its result; whether a row must stay exact) then wait only
for the side stream, whose work depends on what the main stream finished earlier, instead of
draining the main stream's queue and leaving the GPU idle while the host catches up.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_SIDE: dict[torch.device, "torch.cuda.Stream"] = {}


def mark(device: torch.device) -> "torch.cuda.Event | None":
    """An event on the current stream of `device` (None off CUDA or while a CUDA graph is captured:
    the work then runs in order, where it was asked for)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


@contextmanager
def after(event: "torch.cuda.Event | None", device: torch.device, reads: tuple[torch.Tensor, ...] = ()):
    """Run the body's CUDA work on a side stream of `device` that first waits for `event` (from `mark`);
    the current stream then waits for the body's work before anything it queues later. `reads`:
    tensors of the main stream the body reads (their memory is not reused until the side stream is
    done with them). With event None the body runs on the current stream."""
    if event is None:
        yield
        return
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    main = torch.cuda.current_stream(device)
    side = _SIDE.get(device)
    if side is None:
        side = _SIDE[device] = torch.cuda.Stream(device)
    side.wait_event(event)
    for t in reads:
        t.record_stream(side)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        main.wait_stream(side)
