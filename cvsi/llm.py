"""OpenAI-compatible chat-completions client and CVSI's two LLM prompts.

Works with any server speaking ``POST {base_url}/chat/completions`` (OpenAI, vLLM, llama.cpp, Ollama,
...). Only the standard library is used (``urllib``). Requests run in a thread pool; 429, 5xx,
time-outs and connection errors are retried with exponential back-off (honouring ``Retry-After``);
an answer that cannot be parsed is requested again and, if it stays malformed, recorded as a
failure with its query id — never used.

The two prompts (paper §III-C): ``p_m`` rewrites one reference caption ``C_i^B`` with the modification
text ``T`` into a modified caption ``C_i^M``; ``p_a`` names the objects most likely added (``F_add``).
The wording here is this project's; pass your own template files to reproduce another release's
exact prompts.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tqdm import tqdm

from cvsi.cache import JsonCache, fingerprint

__all__ = [
    "LLMError", "MalformedAnswer", "ChatConfig", "ChatClient", "LLMJob", "LLMFailure", "run_jobs",
    "MODIFY_PROMPT", "OBJECTS_PROMPT", "MODIFY_MARKER", "OBJECTS_MARKER", "build_messages",
    "parse_edited_description", "parse_added_objects", "ENV_BASE_URL", "ENV_MODEL", "ENV_API_KEY",
]

_logger = logging.getLogger("cir.cvsi.llm")

ENV_BASE_URL = "CVSI_LLM_BASE_URL"  # falls back to OPENAI_BASE_URL
ENV_MODEL = "CVSI_LLM_MODEL"
ENV_API_KEY = "OPENAI_API_KEY"
_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx

MODIFY_MARKER = "Edited Description:"
OBJECTS_MARKER = "Objects most likely added:"

MODIFY_PROMPT = f"""You rewrite image descriptions. After "Image Content:" you get a description of an image, \
after "Instruction:" a request to change that image. Write one short description of the image as it \
looks after the change. Describe only the changed image, not the original one and not the change \
itself, and do not invent details that neither the description nor the request implies. Answer with a \
single line starting with "{MODIFY_MARKER}".

Image Content: a brown dog lying on a sofa
Instruction: replace the dog with two cats and make the sofa red
{MODIFY_MARKER} two cats lying on a red sofa

Image Content: a plate with rice, beans and a fried egg
Instruction: take away the egg and show it from above
{MODIFY_MARKER} a plate of rice and beans seen from above"""

OBJECTS_PROMPT = f"""After "Image Content:" you get a description of an image, after "Instruction:" a \
request to change that image. Name the objects that the change most likely adds to the image, as a \
short comma-separated list of noun phrases keeping the details the request gives (colour, number, \
material). Answer with a single line starting with "{OBJECTS_MARKER}".

Image Content: a man holding a fish on a pier
Instruction: show a crowd watching him from behind a fence
{OBJECTS_MARKER} a crowd of people, a fence

Image Content: a white cup on a desk
Instruction: make it a pair of red mugs
{OBJECTS_MARKER} two red mugs"""


class LLMError(RuntimeError):
    """A request failed for good (after retries, or with a non-retryable HTTP status)."""


class MalformedAnswer(ValueError):
    """The server's body or the model's answer does not have the expected form."""


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ChatConfig:
    """Connection and generation settings.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the server's model name.
        api_key: sent as ``Authorization: Bearer``; None for local servers without keys.
        temperature: 0 (the paper's setting) makes answers repeatable.
        max_tokens: answer length limit.
        timeout: seconds per request.
        max_retries: retries after the first attempt (transient errors and malformed answers).
        backoff: first back-off in seconds, doubled per retry, capped by ``max_backoff``.
        concurrency: requests in flight at once.
    """

    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    max_retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    concurrency: int = 8

    @classmethod
    def from_env(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 **kwargs: Any) -> "ChatConfig":
        """Flags first, then ``CVSI_LLM_BASE_URL`` / ``OPENAI_BASE_URL``, ``CVSI_LLM_MODEL``, ``OPENAI_API_KEY``."""
        base_url = base_url or os.environ.get(ENV_BASE_URL) or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get(ENV_MODEL)
        if not base_url or not model:
            raise ValueError(
                f"the LLM needs a base URL and a model: pass --llm_base_url / --llm_model or set {ENV_BASE_URL} / "
                f"{ENV_MODEL} (or import precomputed answers with --llm_answers_file)"
            )
        return cls(base_url=base_url, model=model, api_key=api_key or os.environ.get(ENV_API_KEY), **kwargs)

    def identity(self) -> dict[str, Any]:
        """What determines the answers (cache identity): not the URL or key."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}


class ChatClient:
    """Blocking chat-completions calls with retries; safe to share between threads."""

    def __init__(self, config: ChatConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep
        self._url = config.base_url.rstrip("/") + "/chat/completions"

    def _post(self, messages: Sequence[Mapping[str, str]]) -> str:
        """One request; returns the answer text. Raises _Transient, LLMError or MalformedAnswer."""
        body = json.dumps({
            "model": self.config.model, "messages": list(messages),
            "temperature": self.config.temperature, "max_tokens": self.config.max_tokens,
        }).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            if exc.code in _RETRY_STATUS or exc.code >= 500:
                raise _Transient(f"HTTP {exc.code}: {detail}", _retry_after(exc.headers.get("Retry-After"))) from exc
            raise LLMError(f"HTTP {exc.code} from {self._url}: {detail}") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise _Transient(f"timed out after {self.config.timeout} s") from exc
        except urllib.error.URLError as exc:  # connection refused / reset, DNS, time-out while connecting
            raise _Transient(f"connection failed: {exc.reason}") from exc
        except (ConnectionError, http.client.HTTPException) as exc:  # reset, truncated or garbled response
            raise _Transient(f"connection failed: {exc}") from exc
        return _answer_text(raw)

    def complete(self, messages: Sequence[Mapping[str, str]], parse: Callable[[str], str]) -> str:
        """Send ``messages`` and return ``parse(answer)``, retrying transient errors and malformed answers.

        Raises:
            LLMError: still failing after ``max_retries`` retries, or a non-retryable HTTP error.
        """
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                return parse(self._post(messages))
            except _Transient as exc:
                last, hint = str(exc), exc.retry_after
            except MalformedAnswer as exc:
                last, hint = f"malformed answer: {exc}", None
            if attempt < self.config.max_retries:
                delay = hint if hint is not None else self.config.backoff * 2**attempt
                self._sleep(min(delay, self.config.max_backoff))
        raise LLMError(f"gave up after {self.config.max_retries + 1} attempts; last error: {last}")


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: fall back to the exponential schedule
        return None


def _answer_text(raw: bytes) -> str:
    """``choices[0].message.content`` of a chat-completions body."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedAnswer(f"body is not JSON: {raw[:80]!r}") from exc
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise MalformedAnswer(f"no choices[0].message.content in {str(body)[:120]}") from exc
    if not isinstance(content, str):
        raise MalformedAnswer(f"content is {type(content).__name__}, not text")
    return content


# ------------------------------------------------------------------------------------------ prompts
def build_messages(template: str, caption: str, instruction: str, marker: str) -> list[dict[str, str]]:
    """One user message: the template, then ``Image Content: …``, ``Instruction: …`` and the answer marker."""
    text = f"{template.rstrip()}\n\nImage Content: {caption.strip()}\nInstruction: {instruction.strip()}\n{marker}"
    return [{"role": "user", "content": text}]


def _after_marker(text: str, marker: str) -> str:
    """The first non-empty line after the last ``marker`` (or of the whole text), cleaned of markdown
    emphasis, quotes and brackets."""
    lowered, key = text.lower(), marker.lower().rstrip(":")
    position = lowered.rfind(key)
    if position >= 0:
        text = text[position + len(key):].lstrip("*: \t")
    for line in text.splitlines():
        line = line.strip().strip("*_`\"'[]").strip()
        if line:
            return line
    return ""


def parse_edited_description(text: str) -> str:
    """The modified caption ``C^M`` from an answer to :data:`MODIFY_PROMPT`."""
    answer = _after_marker(text, MODIFY_MARKER)
    if not answer or answer.lower().startswith(("image content", "instruction")):
        raise MalformedAnswer(f"no edited description in {text[:120]!r}")
    return answer


def parse_added_objects(text: str) -> str:
    """The objects most likely added, ``F_add``, from an answer to :data:`OBJECTS_PROMPT`."""
    answer = _after_marker(text, OBJECTS_MARKER)
    if not answer or answer.lower().startswith(("image content", "instruction")):
        raise MalformedAnswer(f"no objects in {text[:120]!r}")
    return answer


# ------------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class LLMJob:
    """One prompt to answer; ``kind`` is 'modified_caption' (``index`` = caption i) or 'added_objects'."""

    query_id: str
    kind: str
    index: int
    messages: list[dict[str, str]] = field(hash=False)
    parse: Callable[[str], str] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        """Cache key: the exact prompt (the model is the cache's identity)."""
        return fingerprint(self.messages)


@dataclass(frozen=True)
class LLMFailure:
    query_id: str
    kind: str
    index: int
    error: str


def run_jobs(
    client: ChatClient, jobs: Sequence[LLMJob], cache: JsonCache, flush_every: int = 32, desc: str = "LLM"
) -> tuple[dict[str, str], list[LLMFailure]]:
    """Answer every job not yet in ``cache`` with up to ``concurrency`` requests in flight.

    Answers are written to the cache every ``flush_every`` answers and when the loop ends (also on an
    exception or interrupt), so a killed run keeps what it got. Failures are returned, not cached, so
    the next run tries them again.

    Returns:
        ({job key: parsed answer} for every job answered now or before, failures).
    """
    todo = {job.key: job for job in jobs if job.key not in cache}
    answers = {job.key: cache[job.key] for job in jobs if job.key in cache}
    failures: list[LLMFailure] = []
    pending: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, client.config.concurrency))
    futures = {}
    try:
        futures = {pool.submit(client.complete, job.messages, job.parse): job for job in todo.values()}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False):
            job = futures[future]
            try:
                pending[job.key] = future.result()
            except LLMError as exc:
                failures.append(LLMFailure(job.query_id, job.kind, job.index, str(exc)))
                _logger.warning("LLM failure for query %s (%s %d): %s", job.query_id, job.kind, job.index, exc)
            if len(pending) >= flush_every:
                cache.put(pending)
                answers.update(pending)
                pending = {}
    finally:
        # On an interrupt: drop the queued requests, wait for those in flight, keep every answer received.
        pool.shutdown(wait=True, cancel_futures=True)
        for future, job in futures.items():
            if job.key not in pending and job.key not in answers and future.done() and not future.cancelled() \
                    and future.exception() is None:
                pending[job.key] = future.result()
        cache.put(pending)
        answers.update(pending)
    return answers, failures
