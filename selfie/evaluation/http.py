"""JSON over HTTP for judges served elsewhere: bounded concurrency, timeouts, retries, an API key read from the
environment (never written anywhere), and a log of the answers received, so that an interrupted stage resumes
without asking the server again for what it already answered."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from selfie.errors import SelfieError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # worth asking again; any other 4xx is the request's fault


@dataclass(frozen=True)
class Endpoint:
    """Where a judge is served and how patiently it is asked."""

    base_url: str
    api_key_env: str | None = None  # the environment variable holding the key; the key itself is never stored
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # further tries after a connection error, a timeout or a 5xx / 429 answer
    concurrency: int = 4  # requests in flight at once

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/") if path else self.base_url

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise SelfieError(f"the environment variable {self.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers


def request_json(endpoint: Endpoint, path: str, body: dict | None = None) -> dict | list:
    """GET (body None) or POST `body` to endpoint/path; the decoded JSON answer. Transient failures are tried
    again `endpoint.retries` times with a growing pause; what still fails is one line naming the URL."""
    url, data = endpoint.url(path), None if body is None else json.dumps(body).encode()
    reason = ""
    for attempt in range(endpoint.retries + 1):
        if attempt:
            time.sleep(min(2.0**attempt, 30.0))
        try:
            request = urllib.request.Request(url, data=data, headers=endpoint.headers())
            with urllib.request.urlopen(request, timeout=endpoint.timeout) as answer:
                text = answer.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}: {_server_message(e)}"
            if e.code not in RETRY_STATUS:
                raise SelfieError(f"{url} answered {reason}") from None
            continue
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = str(getattr(e, "reason", e))
            continue
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise SelfieError(f"{url} answered something that is not JSON: {text[:120]!r}") from None
    raise SelfieError(f"{url}: no answer after {endpoint.retries + 1} tries ({reason})")


def _server_message(error: urllib.error.HTTPError) -> str:
    """The message an OpenAI-compatible server puts in its error body, else the body's start."""
    body = error.read().decode("utf-8", errors="replace")
    try:
        detail = json.loads(body)
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:300]
    except json.JSONDecodeError:
        return body[:300] or str(error.reason)


class AnswerLog:
    """The answers received so far, one JSON line per request (keyed by a hash of its body), appended as each
    arrives and read back on a rerun; a line torn by a kill is ignored. Without a path it only remembers."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path, self.answers, self._lock = (Path(path) if path else None), {}, threading.Lock()
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.answers[row["key"]] = row["answer"]

    @staticmethod
    def key(path: str, body: dict) -> str:
        return hashlib.sha256(json.dumps([path, body], sort_keys=True).encode()).hexdigest()

    def put(self, key: str, answer: dict) -> None:
        with self._lock:
            self.answers[key] = answer
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "answer": answer}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())


def ask_all(endpoint: Endpoint, path: str, bodies: Sequence[dict], log: AnswerLog, check: Callable[[dict], None]) -> list[dict]:
    """The answers to POSTing each body to endpoint/path, in order: those in `log` are not asked again, the rest
    `endpoint.concurrency` at a time, each checked (`check` raises on nonsense) before it is logged."""
    keys = [AnswerLog.key(path, body) for body in bodies]
    todo = {k: body for k, body in zip(keys, bodies) if k not in log.answers}

    def ask(key: str) -> None:
        answer = request_json(endpoint, path, todo[key])
        check(answer)
        log.put(key, answer)

    if todo:
        pool = ThreadPoolExecutor(max_workers=endpoint.concurrency)
        try:
            for future in [pool.submit(ask, key) for key in todo]:
                future.result()
        finally:  # the first failure stops the stage; what was answered stays logged
            pool.shutdown(cancel_futures=True)
    return [log.answers[k] for k in keys]
