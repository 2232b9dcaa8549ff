"""Chat completions through the ``openai`` client, run concurrently with a disk cache and failure records.

Any server speaking the OpenAI chat-completions API works through ``base_url`` (OpenAI, vLLM,
llama.cpp, Ollama, ...). Transport is the ``openai`` package's: it retries time-outs, connection
errors, 408 / 409 / 429 and 5xx up to ``max_retries`` times with its exponential back-off (honouring
``Retry-After``). Around it this module keeps what the library does not do: an answer that cannot be
parsed is requested again (``max_retries`` times, our back-off) and, if it stays malformed, recorded
as a failure with its query id — never used; many requests run at once (a thread pool); answers are
cached on disk as they arrive.

The prompts themselves, the message layout and the answer parsers are in :mod:`cvsi.prompts`.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


from cvsi.cache import JsonCache, fingerprint
from utils import UserError, progress

__all__ = [
    "LLMError", "MalformedAnswer", "ChatConfig", "ChatClient", "LLMJob", "LLMFailure", "run_jobs",
    "ENV_BASE_URL", "ENV_MODEL", "ENV_API_KEY",
]

_logger = logging.getLogger("cir.cvsi.llm")

ENV_BASE_URL = "CVSI_LLM_BASE_URL"  # falls back to OPENAI_BASE_URL
ENV_MODEL = "CVSI_LLM_MODEL"
ENV_API_KEY = "OPENAI_API_KEY"
# Local servers take no key, but the openai client insists on one; they ignore what is sent.
_NO_KEY = "no-key"
_DETAIL_CHARS = 200


class LLMError(UserError, RuntimeError):
    """A request failed for good (after the client's retries, or with a non-retryable HTTP status)."""


class MalformedAnswer(ValueError):
    """The server's body or the model's answer does not have the expected form."""


@dataclass(frozen=True)
class ChatConfig:
    """Connection and generation settings.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the server's model name.
        api_key: sent as ``Authorization: Bearer``; None for local servers without keys. Never part of
            the repr, the cache identity or any file written.
        temperature: 0 (the paper's and the release's setting) makes answers repeatable.
        max_tokens: answer length limit (the release: 700).
        stop: stop sequences (the release: a blank line and ``<|endoftext|>``); empty for none.
        timeout: seconds per request (the openai client's ``timeout``).
        max_retries: the openai client's ``max_retries`` for transport errors, and the number of times a
            malformed answer is requested again.
        backoff: first delay before asking again after a malformed answer, doubled per retry, capped by
            ``max_backoff`` (transport retries use the openai client's own back-off).
        concurrency: requests in flight at once.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
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
        """What determines the answers (cache identity): not the URL, key or transport settings."""
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "stop": list(self.stop)}


class ChatClient:
    """Blocking chat-completions calls with retries; safe to share between threads.

    Args:
        config: connection and generation settings.
        sleep: waits between re-asks after malformed answers (tests pass a no-op).
    """

    def __init__(self, config: ChatConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        try:
            import openai
        except ImportError as exc:
            raise ImportError("the LLM client needs the openai package: pip install -r requirement.txt") from exc
        self.config = config
        self._sleep = sleep
        self._openai = openai
        self._client = openai.OpenAI(base_url=config.base_url, api_key=config.api_key or _NO_KEY,
                                     max_retries=config.max_retries, timeout=config.timeout)

    def _request(self, messages: Sequence[Mapping[str, str]]) -> str:
        """One request (with the client's transport retries); returns the answer text.

        Raises:
            LLMError: HTTP error or no connection after the client's retries, or a non-retryable status.
            MalformedAnswer: a body that is not a chat completion, or no text answer in it.
        """
        openai = self._openai
        stop = list(self.config.stop) if self.config.stop else openai.omit
        try:
            completion = self._client.chat.completions.create(
                model=self.config.model, messages=list(messages), temperature=self.config.temperature,
                max_tokens=self.config.max_tokens, stop=stop,
            )
        except openai.APIStatusError as exc:
            detail = exc.response.text[:_DETAIL_CHARS]
            raise LLMError(_gave_up(exc.request, f"HTTP {exc.status_code} from {self.config.base_url}: {detail}")) from exc
        except openai.APITimeoutError as exc:
            raise LLMError(_gave_up(exc.request, f"timed out after {self.config.timeout} s")) from exc
        except openai.APIConnectionError as exc:
            raise LLMError(_gave_up(exc.request, f"connection failed: {exc.__cause__ or exc}")) from exc
        except (ValueError, openai.APIResponseValidationError) as exc:  # 200 with a body that is not JSON / not an object
            raise MalformedAnswer(f"body is not a chat completion ({exc})") from exc
        choices = getattr(completion, "choices", None)
        if not choices:
            raise MalformedAnswer("no choices in the answer")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            raise MalformedAnswer(f"choices[0].message.content is {type(content).__name__}, not text")
        return content

    def complete(self, messages: Sequence[Mapping[str, str]], parse: Callable[[str], str]) -> str:
        """Send ``messages`` and return ``parse(answer)``; a malformed answer is requested again.

        Raises:
            LLMError: a transport failure the client's retries did not fix, or still malformed after
                ``max_retries`` re-asks.
        """
        last = ""
        for attempt in range(self.config.max_retries + 1):
            try:
                return parse(self._request(messages))
            except MalformedAnswer as exc:
                last = f"malformed answer: {exc}"
            if attempt < self.config.max_retries:
                self._sleep(min(self.config.backoff * 2**attempt, self.config.max_backoff))
        raise LLMError(f"gave up after {self.config.max_retries + 1} attempts; last error: {last}")


def _gave_up(request: Any, error: str) -> str:
    """``error``, prefixed with the number of attempts when the client retried (it numbers its retries
    in the ``x-stainless-retry-count`` header of the last request)."""
    retries = int(request.headers.get("x-stainless-retry-count", 0)) if request is not None else 0
    return f"gave up after {retries + 1} attempts; last error: {error}" if retries else error


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
        """Cache key: the exact prompt (the model and the parser are the cache's identity)."""
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
        for future in progress(as_completed(futures), desc, total=len(futures)):
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
