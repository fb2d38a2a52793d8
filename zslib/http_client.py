"""One JSON request to a server of ours or the field's (the simulator server, a retrieval server), with
bounded retries: a server that is down or slow is an error naming its URL, never a hang."""

from __future__ import annotations

import time


def post_json(url: str, body: dict, *, server: str, error: type[Exception], hint: str, timeout_s: float,
              retries: int, backoff_s: float):
    """POST ``body`` as JSON to ``url`` and return the decoded answer. A timeout, a dropped connection or a
    5xx answer is tried again ``retries`` times with doubling pauses; then, or at once for a 4xx answer or
    one that is not JSON, ``error`` says "<server> <url> ..." (``hint``: what to do when it never answered)."""
    import requests
    problem = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            reply = requests.post(url, json=body, timeout=timeout_s)
        except requests.exceptions.Timeout:
            problem = f"did not answer within {timeout_s:g} s"
            continue
        except requests.exceptions.ConnectionError as e:
            problem = f"is not reachable ({type(e).__name__})"
            continue
        if reply.status_code >= 500:
            problem = f"answered HTTP {reply.status_code}: {reply.text[:300]}"
            continue
        if reply.status_code >= 400:
            raise error(f"{server} {url} refused the request: HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            return reply.json()
        except ValueError:
            raise error(f"{server} {url} answered something that is not JSON: {reply.text[:300]!r}") from None
    raise error(f"{server} {url} {problem} ({retries + 1} tries). {hint}")
