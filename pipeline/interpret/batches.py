"""The interpretation stages' shared contract: prompts, request ids, batch state, results, verdicts, cost.

Folder (default runs/interpretation/<task>/, task = explain or detect):
    state.json          submissions (batch id, custom ids, ended) and per-request status; written atomically
    results/<batch>.jsonl  raw results as the API returned them, one JSON object per line
    dry_run.jsonl       --dry-run: the requests that would be sent
    manifest.json       of the parse step: config, counts, failures, scores
The API key is read from ANTHROPIC_API_KEY by the client and never stored.

custom_id = "<task>-<latent>-<attempt>": a latent whose request errored, expired or was canceled is
sent again with the next attempt number; one that is submitted or answered never is.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llama_3.errors import PipelineInputError
from pipeline.core import fault_injection
from pipeline.core.manifest import atomic_path, write_json_atomic

DEFAULT_MODEL = "claude-sonnet-4-5"
# $ per million tokens (input, output) at standard rates; Message Batches bill half of that.
PRICES = {"claude-sonnet-4-5": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0), "claude-opus-4-1": (15.0, 75.0)}
BATCH_DISCOUNT = 0.5
MAX_REQUESTS_PER_BATCH = 100_000  # API limits per batch: 100,000 requests or 256 MB
MAX_BATCH_BYTES = 256 * 1000 * 1000
RETRY_STATUSES = ("errored", "canceled", "expired")
OFFLINE_BATCH = "offline"

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher. You study one feature (a latent of a sparse autoencoder) of a "
    "language model at a time, from the sentences where it activates."
)

# Format strings (str.format): {{ }} are literal braces.
EXPLAIN_PROMPT = (
    "Below are {n} sentences on which feature {latent} activates: the first {n_top} are those where it activates "
    "most strongly, the others a random sample of the sentences where it activates at all (weaker ones "
    "included). Tokens where it activates are marked «like this»(a), where a is the activation on a 0-10 scale "
    "relative to the feature's strongest activation.\n"
    "\n"
    "{sentences}\n"
    "\n"
    "Analyse step by step:\n"
    "1. Key words and phrases: which marked tokens and their immediate contexts recur?\n"
    "2. Themes: what topics, grammatical roles or kinds of text do the sentences share?\n"
    "3. Outliers: which sentences do not fit, and does that change your reading?\n"
    "4. Shared meaning: state, in a short phrase, what the feature responds to.\n"
    "\n"
    "End your answer with one line of JSON and nothing after it:\n"
    '{{"meaning": "<a short phrase>", "certainty": <a number from 0 to 1: how sure you are that the '
    "phrase covers most of these sentences, strong and weak>}}"
)

DETECT_PROMPT = (
    'A feature of a language model was described as: "{meaning}"\n'
    "\n"
    "Below are {n} numbered sentences. Some of them are sentences where the feature activates (strongly or "
    "weakly); "
    "the others are sentences where it does not activate at all.\n"
    "\n"
    "{sentences}\n"
    "\n"
    "Which sentences fit the description? Think briefly, then end your answer with one line of JSON and "
    "nothing after it:\n"
    '{{"activating": [<the numbers of the sentences that fit>]}}'
)


Task = Literal["explain", "detect"]


def task_dir(root: str | Path, task: str) -> Path:
    if task not in ("explain", "detect"):
        raise PipelineInputError(f"--task {task!r}: expected explain or detect")
    return Path(root) / task


def custom_id(task: str, latent: int, attempt: int) -> str:
    return f"{task}-{latent}-{attempt}"


def parse_custom_id(cid: str) -> tuple[str, int, int]:
    task, latent, attempt = cid.rsplit("-", 2)
    return task, int(latent), int(attempt)


def mark_tokens(tokens: list[str], activations: list[float], peak: float, threshold: float = 0.2) -> str:
    """Sentence text with tokens above threshold * peak marked «token»(a), a on a 0-10 scale."""
    out = []
    for tok, a in zip(tokens, activations):
        if peak > 0 and a >= threshold * peak:
            lead = tok[: len(tok) - len(tok.lstrip())]
            out.append(f"{lead}«{tok.strip()}»({round(10 * a / peak)})")
        else:
            out.append(tok)
    return "".join(out).strip()


def explain_params(latent: int, marked_sentences: list[str], n_top: int, model: str, max_tokens: int) -> dict:
    """marked_sentences: the n_top strongest first, then the random sample's."""
    body = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(marked_sentences))
    return {
        "model": model,
        "max_tokens": max_tokens,
        "system": EXPLAIN_SYSTEM,
        "messages": [
            {
                "role": "user",
                "content": EXPLAIN_PROMPT.format(n=len(marked_sentences), n_top=n_top, latent=latent, sentences=body),
            }
        ],
    }


def detect_params(meaning: str, sentences: list[str], model: str, max_tokens: int) -> dict:
    body = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(sentences))
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [
            {"role": "user", "content": DETECT_PROMPT.format(meaning=meaning, n=len(sentences), sentences=body)}
        ],
    }


# ---- batch state ------------------------------------------------------------------------------


@dataclass
class BatchState:
    """What has been submitted and what came back, for one task folder."""

    path: Path
    submissions: list[dict] = field(default_factory=list)  # {"index", "batch_id", "created", "custom_ids", "ended"}
    requests: dict[str, dict] = field(
        default_factory=dict
    )  # custom_id -> {"latent", "attempt", "submission", "status"}
    extra: dict = field(default_factory=dict)  # task data, e.g. the detect task's answer keys

    @staticmethod
    def load(directory: Path) -> "BatchState":
        path = Path(directory) / "state.json"
        if not path.is_file():
            return BatchState(path)
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise PipelineInputError(
                f"{path}: not valid JSON ({e}); it is written atomically, so this file was edited by hand"
            ) from None
        return BatchState(path, doc["submissions"], doc["requests"], doc.get("extra", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"submissions": self.submissions, "requests": self.requests, "extra": self.extra})

    def add_submission(self, batch_id: str | None, custom_ids: list[str], status: str, ended: bool) -> dict:
        """Record a submission and its requests (status: pending before the API call, succeeded offline)."""
        index = len(self.submissions)
        sub = {
            "index": index,
            "batch_id": batch_id,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            "custom_ids": list(custom_ids),
            "ended": ended,
        }
        self.submissions.append(sub)
        for cid in custom_ids:
            _, latent, attempt = parse_custom_id(cid)
            self.requests[cid] = {"latent": latent, "attempt": attempt, "submission": index, "status": status}
        return sub

    def latest(self) -> dict[int, tuple[str, dict]]:
        """latent -> (custom_id, entry) of its highest attempt."""
        out: dict[int, tuple[str, dict]] = {}
        for cid, e in self.requests.items():
            if e["latent"] not in out or e["attempt"] > out[e["latent"]][1]["attempt"]:
                out[e["latent"]] = (cid, e)
        return out

    def next_attempt(self, latent: int) -> int | None:
        """The attempt number to send for this latent, or None when it is in flight or answered."""
        cur = self.latest().get(latent)
        if cur is None:
            return 0
        return cur[1]["attempt"] + 1 if cur[1]["status"] in RETRY_STATUSES else None


def bind_state_to_sae(state: BatchState, digest: str, where: str) -> None:
    """An interpretation folder belongs to one SAE: answers about another SAE's latents would be
    silently wrong, so a mismatch is refused (states written before this check are adopted)."""
    bound = state.extra.get("sae_sha256")
    if bound and bound != digest:
        raise PipelineInputError(
            f"{where}: holds interpretation requests for SAE {bound[:8]}, but the top sentences are of SAE "
            f"{digest[:8]}; use --force (discards that state) or another --out"
        )
    state.extra["sae_sha256"] = digest


def chunk_requests(
    requests: list[dict], max_requests: int = MAX_REQUESTS_PER_BATCH, max_bytes: int = MAX_BATCH_BYTES
) -> list[list[dict]]:
    """Split into batches within the API's per-batch request count and size limits."""
    chunks, cur, size = [], [], 0
    for r in requests:
        n = len(json.dumps(r).encode())
        if cur and (len(cur) >= max_requests or size + n > max_bytes):
            chunks.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def estimate_cost(requests: list[dict], model: str, expected_output_tokens: int) -> dict:
    """Batch-priced estimate: input tokens ~ characters / 3.5 (English prose with markup)."""
    chars = sum(
        len(r["params"].get("system", "")) + sum(len(m["content"]) for m in r["params"]["messages"]) for r in requests
    )
    tokens_in, tokens_out = chars / 3.5, expected_output_tokens * len(requests)
    price_in, price_out = PRICES.get(model, PRICES[DEFAULT_MODEL])
    usd = BATCH_DISCOUNT * (tokens_in * price_in + tokens_out * price_out) / 1e6
    return {
        "model": model,
        "requests": len(requests),
        "input_tokens_est": round(tokens_in),
        "output_tokens_est": tokens_out,
        "usd_est": round(usd, 4),
        "usd_per_1000_requests_est": round(1000 * usd / max(len(requests), 1), 4),
        "prices_per_mtok": {"input": price_in, "output": price_out, "batch_discount": BATCH_DISCOUNT},
        "price_source": "known list price" if model in PRICES else f"unknown model: {DEFAULT_MODEL} prices assumed",
    }


def make_client(base_url: str | None = None, max_retries: int = 5):
    """The anthropic client; the key comes from ANTHROPIC_API_KEY only. 429 and 5xx are retried with
    exponential backoff by the SDK (max_retries)."""
    # imported here, not at the top: ~2.8 s, and only runs with a key (or a fake server) need it
    import anthropic

    if not os.environ.get("ANTHROPIC_API_KEY"):
        raise PipelineInputError("ANTHROPIC_API_KEY is not set (without it, send uses the offline explainer)")
    return anthropic.Anthropic(
        base_url=base_url or os.environ.get("ANTHROPIC_BASE_URL") or None, max_retries=max_retries
    )


# ---- batch lifecycle: submit, adopt after a crash, fetch what ended --------------------------


def submit(state: BatchState, client, requests: list[dict]) -> None:
    """One batch per chunk; the submission is recorded (pending) before the API call, so a crash
    between the call and the record is recovered by adopt_pending() on the next run."""
    for chunk in chunk_requests(requests):
        sub = state.add_submission(None, [r["custom_id"] for r in chunk], "pending", ended=False)
        state.save()
        batch = client.messages.batches.create(requests=chunk)
        fault_injection.point("interpret_send.after_create")  # the worst moment to crash (tests)
        sub["batch_id"] = batch.id
        for r in chunk:
            state.requests[r["custom_id"]]["status"] = "submitted"
        state.save()


def adopt_pending(state: BatchState, client) -> None:
    """A submission recorded as pending has no batch id: the run died around the create call. Adopt
    the batch the API holds for it (created after the record, same request count, not yet known);
    if there is none, the requests never arrived and are dropped so they are sent again."""
    pending = [s for s in state.submissions if s["batch_id"] is None]
    if not pending:
        return
    known = {s["batch_id"] for s in state.submissions}
    batches = list(client.messages.batches.list(limit=100))
    for sub in pending:
        created = dt.datetime.fromisoformat(sub["created"])
        match = next(
            (
                b
                for b in batches
                if b.id not in known
                and b.created_at >= created - dt.timedelta(minutes=5)
                and sum(b.request_counts.model_dump().values()) == len(sub["custom_ids"])
            ),
            None,
        )
        if match is not None:
            sub["batch_id"] = match.id
            known.add(match.id)
            for cid in sub["custom_ids"]:
                state.requests[cid]["status"] = "submitted"
        else:
            for cid in sub["custom_ids"]:
                del state.requests[cid]
            sub["custom_ids"], sub["ended"], sub["batch_id"] = [], True, "never-submitted"
    state.save()


def fetch_ended(state: BatchState, client, directory) -> int:
    """Download the results of every ended batch that has none yet; returns how many are still running."""
    running = 0
    for sub in state.submissions:
        if sub["ended"] or not sub["batch_id"]:
            continue
        batch = client.messages.batches.retrieve(sub["batch_id"])
        if batch.processing_status != "ended":
            running += 1
            continue
        lines = [r.model_dump(mode="json") for r in client.messages.batches.results(sub["batch_id"])]
        write_results(directory / "results" / f"{sub['batch_id']}.jsonl", lines)  # raw, before any bookkeeping
        seen = set()
        for line in lines:
            entry = state.requests.get(line["custom_id"])
            if entry is not None:
                entry["status"] = line["result"]["type"]
                seen.add(line["custom_id"])
        for cid in sub["custom_ids"]:
            if cid not in seen:  # the API returned no line for it: treat it like an expired request
                state.requests[cid]["status"] = "expired"
        sub["ended"] = True
        state.save()
    return running


# ---- results -----------------------------------------------------------------------------------


def write_results(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))


def read_results(directory: Path) -> dict[str, dict]:
    """custom_id -> raw result line, over every results file of the task."""
    out = {}
    for p in sorted((Path(directory) / "results").glob("*.jsonl")):
        for number, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    out[r["custom_id"]] = r
                except (ValueError, KeyError, TypeError):
                    raise PipelineInputError(
                        f"{p}: line {number} is not a result record (the file is truncated or corrupted; "
                        "it is written atomically, so it was changed afterwards): delete it and re-run "
                        "the retrieve step, or send --force for offline results"
                    ) from None
    return out


def message_text(result: dict) -> str:
    msg = result["result"].get("message") or {}
    return "".join(b.get("text", "") for b in msg.get("content", []) if b.get("type") == "text")


def succeeded_line(cid: str, text: str, model: str) -> dict:
    """A results line in the API's shape, for answers produced locally (the offline explainer)."""
    return {
        "custom_id": cid,
        "result": {
            "type": "succeeded",
            "message": {
                "id": f"local_{cid}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        },
    }


# ---- verdicts ----------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _json_objects(text: str) -> list[Any]:
    """Every JSON object found in text (fenced blocks first, then balanced {...} spans), last first."""
    found = []
    candidates = [m.group(1) for m in _FENCE.finditer(text)]
    depth, start = 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                candidates.append(text[start : i + 1])
    for c in candidates:
        try:
            found.append(json.loads(c.strip()))
        except ValueError:
            continue
    return found[::-1]


def parse_verdict(text: str) -> tuple[dict | None, str]:
    """-> ({"meaning", "certainty"}, "") or (None, reason). Accepts code fences, text around the JSON,
    integer or percent certainties (85 -> 0.85, "0.7" -> 0.7); rejects empty meanings and out-of-range values."""
    objs = [o for o in _json_objects(text) if isinstance(o, dict) and "meaning" in o]
    if not objs:
        return None, "no JSON object with a 'meaning' field"
    o = objs[0]
    meaning = o.get("meaning")
    if not isinstance(meaning, str) or not meaning.strip():
        return None, "empty or non-string meaning"
    c = o.get("certainty")
    if isinstance(c, str):
        try:
            c = float(c.strip().rstrip("%")) / (100 if c.strip().endswith("%") else 1)
        except ValueError:
            return None, f"certainty {o.get('certainty')!r} is not a number"
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None, f"certainty {c!r} is not a number"
    if 1 < c <= 100:
        c = c / 100  # a percentage
    if not 0 <= c <= 1:
        return None, f"certainty {o.get('certainty')!r} is outside [0, 1]"
    return {"meaning": " ".join(meaning.split()), "certainty": float(c)}, ""


def parse_detection(text: str, n: int) -> tuple[list[int] | None, str]:
    objs = [o for o in _json_objects(text) if isinstance(o, dict) and "activating" in o]
    if not objs or not isinstance(objs[0]["activating"], list):
        return None, "no JSON object with an 'activating' list"
    try:
        picked = sorted({int(i) for i in objs[0]["activating"]})
    except (TypeError, ValueError):
        return None, "non-integer sentence numbers"
    if any(not 1 <= i <= n for i in picked):
        return None, f"sentence numbers outside 1..{n}"
    return picked, ""
