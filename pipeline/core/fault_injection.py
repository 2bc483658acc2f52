"""Fault injection for the tests: named points in the stages where a test can slow a run down (so that its
SIGKILL lands mid-run) or end the process (a crash at the worst moment). Off unless the environment says:

    PIPELINE_FAULTS="capture.batch=sleep:0.05,training.step=sleep:0.03,interpret_send.after_create=exit:9"

Points: capture.batch, training.step, top_sentences.batch (after each batch), interpret_send.after_create
(after the Message Batches API accepted a batch, before the state records it). POINT@RANK acts on that torchrun
rank alone ("training.step@1=sleep:600": one rank hangs while the others wait for it).
"""

from __future__ import annotations

import functools
import os
import time

ENV = "PIPELINE_FAULTS"


@functools.cache
def _faults(spec: str) -> dict[str, tuple[str, float]]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        kind, _, value = action.partition(":")
        if kind not in ("sleep", "exit"):
            raise ValueError(f"{ENV}: {item!r}: expected POINT=sleep:SECONDS or POINT=exit:CODE")
        faults[name] = (kind, float(value or 0))
    return faults


def point(name: str) -> None:
    """Sleep or exit here if the environment asks for it at `name`; nothing otherwise."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    faults = _faults(spec)
    fault = faults.get(f"{name}@{os.environ.get('RANK', '0')}", faults.get(name))
    if fault is None:
        return
    kind, value = fault
    if kind == "sleep":
        time.sleep(value)
    else:
        os._exit(int(value))  # no cleanup, no flush: as a crash
