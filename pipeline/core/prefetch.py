"""Training input: the next batches read on a background thread while the current one trains.

The same code runs on CPU and CUDA. A batch is read from disk in its storage dtype (bf16: half the
bytes of fp32), pinned and copied to the GPU without blocking on CUDA — on a stream of its own, so the copy
overlaps the step's kernels on the default stream, which waits for it only when it takes the batch —, and
widened to fp32 on the device by the consumer, so neither the disk read nor the host-to-device copy waits on
the step.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import torch

from pipeline.core.runtime import set_thread_device


class BatchPrefetcher:
    """Iterate over `keys`, yielding (key, rows on `device` in storage dtype) with `depth` batches
    read ahead by `read(key)` on a thread. Errors on the thread re-raise in the consumer."""

    def __init__(self, keys: Iterable, read: Callable[[object], torch.Tensor], device: torch.device, depth: int = 2):
        self.keys, self.read, self.device = list(keys), read, device
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            set_thread_device(self.device)  # pin_memory() allocates through the thread's current device
            copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            for key in self.keys:
                rows, ready = self.read(key), None
                if copies is not None:
                    with torch.cuda.stream(copies):
                        rows = rows.pin_memory().to(self.device, non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record(copies)
                while not self.stop.is_set():
                    try:
                        self.q.put((key, rows, ready), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            self.q.put(e)
            return
        self.q.put(None)

    def __iter__(self) -> Iterator[tuple[object, torch.Tensor]]:
        try:
            while (item := self.q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                key, rows, ready = item
                if ready is not None:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(ready)  # the step's kernels start after the copy, the host does not wait
                    rows.record_stream(compute)  # the allocator must not reuse its memory before the step is done
                yield key, rows
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
