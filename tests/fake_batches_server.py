"""A local HTTP server that speaks enough of Anthropic's Message Batches API for the real SDK.

Endpoints: POST /v1/messages/batches (create), GET /v1/messages/batches/{id} (retrieve),
GET /v1/messages/batches/{id}/results (JSONL), POST /v1/messages/batches/{id}/cancel, GET
/v1/messages/batches (list). `answer(custom_id, params)` decides each request's result:
("succeeded", text) | ("errored", message) | ("expired", None) | ("canceled", None).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class FakeBatches:
    def __init__(
        self, answer: Callable[[str, dict], tuple[str, str | None]], polls_until_end: int = 1, fail_creates: int = 0
    ):
        self.answer, self.polls_until_end, self.fail_creates = answer, polls_until_end, fail_creates
        self.batches: dict[str, dict] = {}
        self.headers_seen: list[dict] = []
        self.create_attempts = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body, content_type="application/json", headers=None):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["v1", "messages", "batches"]:
                    with server.lock:
                        server.create_attempts += 1
                        if server.create_attempts <= server.fail_creates:
                            return self._send(
                                429,
                                {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
                                headers={"retry-after": "0"},
                            )
                        bid = f"msgbatch_{len(server.batches):04d}"
                        server.batches[bid] = {
                            "requests": body["requests"],
                            "created": dt.datetime.now(dt.timezone.utc),
                            "polls": 0,
                            "canceled": False,
                        }
                    return self._send(200, server.batch_object(bid))
                if len(parts) == 5 and parts[4] == "cancel":
                    server.batches[parts[3]]["canceled"] = True
                    return self._send(200, server.batch_object(parts[3]))
                self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

            def do_GET(self):
                server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["v1", "messages", "batches"]:
                    data = [server.batch_object(b, count_poll=False) for b in sorted(server.batches, reverse=True)]
                    return self._send(
                        200,
                        {
                            "data": data,
                            "has_more": False,
                            "first_id": data[0]["id"] if data else None,
                            "last_id": data[-1]["id"] if data else None,
                        },
                    )
                if len(parts) == 4 and parts[3] in server.batches:
                    return self._send(200, server.batch_object(parts[3], count_poll=True))
                if len(parts) == 5 and parts[4] == "results":
                    lines = "".join(json.dumps(line) + "\n" for line in server.results(parts[3]))
                    return self._send(200, lines, content_type="application/binary")
                self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ended(self, bid: str) -> bool:
        b = self.batches[bid]
        return b["canceled"] or b["polls"] > self.polls_until_end

    def batch_object(self, bid: str, count_poll: bool = False) -> dict:
        b = self.batches[bid]
        if count_poll:
            b["polls"] += 1
        ended = self.ended(bid)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if ended:
            for line in self.results(bid):
                counts[line["result"]["type"]] += 1
        else:
            counts["processing"] = len(b["requests"])
        return {
            "id": bid,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts,
            "created_at": _iso(b["created"]),
            "expires_at": _iso(b["created"] + dt.timedelta(days=1)),
            "ended_at": _iso(b["created"]) if ended else None,
            "archived_at": None,
            "cancel_initiated_at": _iso(b["created"]) if b["canceled"] else None,
            "results_url": f"{self.url}/v1/messages/batches/{bid}/results" if ended else None,
        }

    def results(self, bid: str) -> list[dict]:
        out = []
        for r in self.batches[bid]["requests"]:
            kind, text = (
                ("canceled", None) if self.batches[bid]["canceled"] else self.answer(r["custom_id"], r["params"])
            )
            if kind == "succeeded":
                result = {
                    "type": "succeeded",
                    "message": {
                        "id": f"msg_{r['custom_id']}",
                        "type": "message",
                        "role": "assistant",
                        "model": r["params"]["model"],
                        "content": [{"type": "text", "text": text}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 100, "output_tokens": 50},
                    },
                }
            elif kind == "errored":
                result = {
                    "type": "errored",
                    "error": {"type": "error", "error": {"type": "invalid_request_error", "message": text}},
                }
            else:
                result = {"type": kind}
            out.append({"custom_id": r["custom_id"], "result": result})
        return out
