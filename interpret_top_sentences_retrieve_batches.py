"""Poll the submitted Message Batches and download the results of those that have ended.

Usage:
    python interpret_top_sentences_retrieve_batches.py                  # one pass: fetch what has ended
    python interpret_top_sentences_retrieve_batches.py --wait           # poll until every batch has ended
    python interpret_top_sentences_retrieve_batches.py --task detect --wait --poll-seconds 30

Every result type is recorded per request (succeeded, errored, canceled, expired); raw result
lines are kept in <out>/<task>/results/<batch id>.jsonl, written atomically, so a re-run fetches
only batches that have no results file yet. Errored, expired and canceled latents are sent again by
the send script. 429 and 5xx answers are retried with backoff by the SDK (--max-retries).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from pipeline.core.cli import check_choices, parse_config, run_main
from pipeline.core.layout import INTERPRETATION_DIR
from pipeline.interpret.batches import BatchState, Task, fetch_ended, make_client, task_dir


@dataclass
class RetrieveConfig:
    out: str = field(default=str(INTERPRETATION_DIR), metadata={"help": "interpretation folder (state, results)"})
    task: Task = field(default="explain", metadata={"help": "explain or detect"})
    wait: bool = field(default=False, metadata={"help": "poll until every batch has ended"})
    poll_seconds: float = field(default=60.0, metadata={"help": "seconds between polls with --wait"})
    timeout_minutes: float = field(default=0.0, metadata={"help": "give up waiting after this long (0: never)"})
    base_url: str | None = field(
        default=None, metadata={"help": "API base URL (default: the SDK's; e.g. a local test server)"}
    )
    max_retries: int = field(default=5, metadata={"help": "SDK retries with backoff on 429 / 5xx"})

    def __post_init__(self) -> None:
        check_choices(self)


def main(cfg: RetrieveConfig) -> dict:
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


if __name__ == "__main__":
    run_main(main, parse_config(RetrieveConfig, sys.argv[1:], __doc__))
