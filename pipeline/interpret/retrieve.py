"""The retrieve stage: poll the sent batches and store every result (succeeded, errored, expired, canceled),
resending what failed.
"""

from __future__ import annotations

import time

from pipeline.interpret.batches import BatchState, fetch_ended, make_client, task_dir
from pipeline.interpret.config import RetrieveConfig


def retrieve(cfg: RetrieveConfig) -> dict:
    directory = task_dir(cfg.out, cfg.task)
    state = BatchState.load(directory)
    waiting = [s for s in state.submissions if not s["ended"] and s["batch_id"]]
    running = 0
    if waiting:
        client = make_client(cfg.base_url, cfg.max_retries)
        t0 = time.monotonic()
        while True:
            running = fetch_ended(state, client, directory)
            if not running or not cfg.wait:
                break
            if cfg.timeout_minutes and time.monotonic() - t0 > 60 * cfg.timeout_minutes:
                break
            print(f"{running} batch(es) still processing; next poll in {cfg.poll_seconds:.0f} s", flush=True)
            time.sleep(cfg.poll_seconds)
    counts: dict[str, int] = {}
    for e in state.requests.values():
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    print(
        f"{directory}: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + (f"; {running} batch(es) still processing" if running else "")
    )
    return {"counts": counts, "running": running}
