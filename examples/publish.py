#!/usr/bin/env python3
"""Publishes one agent run to agentcast from outside the server (PROTOCOL.md section 11).

Any program can do what this does: create a run for a user, then send its events in batches.
agentcast numbers them for the user, sends them to every tab of the user in order, exactly
once, and keeps them for resume. This is the standard library only (urllib, json).

    AGENTCAST_URL=http://127.0.0.1:8080 \\
    AGENTCAST_PUBLISHER_TOKEN=$(agentcast token my-service --publisher) \\
    python3 examples/publish.py alice

It streams a small run with a tool call, and sends one batch twice on purpose: the second
time the server accepts nothing (each event has a number `n`, and a retry is harmless), which
is how a publisher that lost an answer (a timeout, a dropped connection) simply sends again.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

URL = os.environ.get("AGENTCAST_URL", "http://127.0.0.1:8080").rstrip("/")
TOKEN = os.environ.get("AGENTCAST_PUBLISHER_TOKEN", "")


def call(method, path, body=None):
    """One request; returns (status, JSON body). HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        URL + path,
        data=data,
        method=method,
        headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Run:
    """A run being published: numbers its events and sends them in batches."""

    def __init__(self, user, agent, input_=None, thread_id=None):
        body = {"user": user, "agent": agent, "input": input_}
        if thread_id:
            body["thread_id"] = thread_id
        status, answer = call("POST", "/v1/publish/runs", body)
        if status != 201:
            raise SystemExit(f"creating the run: HTTP {status}: {answer}")
        self.id = answer["run_id"]
        self.n = 0
        self.pending = []

    def add(self, type_, **data):
        self.n += 1
        self.pending.append({"n": self.n, "type": type_, "data": data})

    def send(self, retries=5):
        """Sends what was added since the last send; retries what the server asks to."""
        batch, self.pending = self.pending, []
        for attempt in range(retries):
            status, answer = call("POST", f"/v1/publish/runs/{self.id}/events", {"events": batch})
            if status == 200:
                return answer
            if status == 429:  # a tab of the user is catching up: try again shortly
                time.sleep(answer.get("retry_after_ms", 100) / 1000)
                continue
            raise SystemExit(f"batch refused: HTTP {status}: {answer}")
        raise SystemExit("batch still refused after retries")

    def resend(self, batch):
        status, answer = call("POST", f"/v1/publish/runs/{self.id}/events", {"events": batch})
        if status != 200:
            raise SystemExit(f"resending: HTTP {status}: {answer}")
        return answer


def main():
    if not TOKEN:
        raise SystemExit("set AGENTCAST_PUBLISHER_TOKEN (agentcast token NAME --publisher)")
    user = sys.argv[1] if len(sys.argv) > 1 else "alice"
    run = Run(user, "python-weather", {"city": "Lisbon"}, thread_id="py-1")
    print(f"run {run.id} for {user}")

    run.add("agent_thinking", text="I need the forecast for Lisbon.")
    run.add("tool_executing", tool_call_id="call_1", tool="forecast", args={"city": "Lisbon"})
    first = list(run.pending)
    print("batch 1:", run.send())

    # The answer to a batch can be lost: sending it again adds nothing.
    again = run.resend(first)
    assert again["accepted"] == 0, again
    print("batch 1 again:", again)

    run.add("tool_progress", tool_call_id="call_1", tool="forecast", message="asking", fraction=0.5)
    run.add("tool_completed", tool_call_id="call_1", tool="forecast", ok=True,
            result={"sky": "sunny", "high_c": 24}, error=None)
    for piece in ["Sunny in Lisbon, ", "with a high of 24°C."]:
        run.add("partial_result", text=piece)
    run.add("agent_completed", status="succeeded",
            result="Sunny in Lisbon, with a high of 24°C.", error=None)
    print("batch 2:", run.send())

    status, view = call("GET", f"/v1/publish/runs/{run.id}")
    print(f"run {run.id}: {view['status']}, {len(view['events'])} events, last_n {view['last_n']}")
    return 0 if status == 200 and view["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
