"""A chat model on an OpenAI-compatible server (``/v1/chat/completions``, streamed), behind ``ChatModel``.

The microphone, VAD and Whisper stay local; only the conversation text goes to the server (vLLM, Ollama, llama.cpp's
server, mlx_lm.server, LM Studio all speak this API). The official ``openai`` client does the HTTP and SSE work.

- **Failures are one line.** Everything the client or the server can throw while loading becomes ``ModelLoadError``,
  while answering ``ModelRuntimeError``, with the server URL and what to do; the worker turns them into ``model-error``.
- **The key stays secret.** It is sent as a bearer token and never appears in a log line, an error message or
  ``repr()`` (messages are scrubbed of it too, in case a server echoes it back).
- **Cancel closes the connection.** The servers stop generating when the client goes away; there is no cancel call.
- **No retries.** A voice turn is waited for live: a failure is reported at once instead of after back-off retries.

``openai`` is imported inside ``load()`` so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .base import ChatMessage, GenerationStep, ModelLoadError, ModelRuntimeError, ShouldStop

logger = logging.getLogger(__name__)

PLACEHOLDER_KEY = "sk-no-key"
"""Sent when no key is configured: the client insists on one, and keyless local servers accept any."""

KEY_HELP = (
    "set the key with llm_api_key in the config file or the SOTTOVOCE_LLM_API_KEY / OPENAI_API_KEY environment variable"
)
SERVER_HELP = "start the server, or check --llm-url (e.g. http://host:8000/v1)"
ANSWER_HELP = "check --llm-url: it should be the server's OpenAI-compatible base URL, usually ending in /v1"


def normalise_base_url(url: str) -> str:
    """``host:8000``, ``http://host:8000`` and ``http://host:8000/v1/`` -> ``http://host:8000/v1``.

    ``/v1`` is added only to a URL without a path: a path someone typed (``https://host/api/openai``) is kept as is."""
    url = url.strip()
    if not url:
        raise ValueError("the chat server URL is empty (pass --llm-url http://host:8000/v1)")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL for the chat server: {display_url(url)!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def display_url(url: str) -> str:
    """The URL without any ``user:password@`` part, for messages and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OpenAIChatModel:
    """One model on an OpenAI-compatible server; use on the model thread only."""

    engine = "openai"
    engine_reason = ""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
    ) -> None:
        """``model``: the name the server knows (empty: the first model it lists); ``api_key``: None for servers
        without one; ``timeout``: the longest wait for the next bytes of an answer; ``connect_timeout``: the longest
        wait to connect, and for ``load()``'s check that the server answers. A malformed URL raises ModelLoadError."""
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        try:
            self.base_url = normalise_base_url(base_url)
        except ValueError as exc:  # a settings mistake: reported like any model that cannot load
            raise ModelLoadError(str(exc)) from None
        self.url = display_url(self.base_url)
        self.model = model.strip()
        # Until load() asks the server, status shows where the model will come from.
        self.name = self.model or f"first model at {self.url}"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._api_key = api_key or None
        self._client: Any = None  # openai.OpenAI

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return f"OpenAIChatModel(url={self.url!r}, model={self.name!r}, api_key={key})"

    # ---- errors ----

    def _scrub(self, text: str) -> str:
        """``text`` without the key (a server may echo it) or the URL's credentials."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text.replace(self.base_url, self.url) if self.base_url != self.url else text

    def _describe(self, exc: BaseException) -> tuple[str, str]:
        """What went wrong, in a few words, and its kind: "key", "connect" or "answer"."""
        import openai

        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return f"the server refused the API key (HTTP {exc.status_code}): {KEY_HELP}", "key"
        if isinstance(exc, openai.APITimeoutError):
            return "no answer in time (timed out)", "connect"
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            details = _one_line(str(cause) or type(cause).__name__) if cause is not None else "no details"
            return f"connection failed ({details})", "connect"
        if isinstance(exc, openai.APIStatusError):
            return f"HTTP {exc.status_code}: {_one_line(_server_message(exc))}", "answer"
        if isinstance(exc, openai.APIError):
            return f"the server reported an error: {_one_line(exc.message)}", "answer"
        if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeDecodeError: not a JSON event stream
            return f"it answered something that is not a JSON event stream ({_one_line(str(exc))})", "answer"
        return f"{type(exc).__name__}: {_one_line(str(exc))}", "answer"

    def _load_error(self, exc: BaseException) -> ModelLoadError:
        what, kind = self._describe(exc)
        hints = {"connect": SERVER_HELP, "answer": ANSWER_HELP}
        text = f"chat server {self.url}: {what}" + (f"; {hints[kind]}" if kind in hints else "")
        return ModelLoadError(self._scrub(text))

    def _runtime_error(self, exc: BaseException) -> ModelRuntimeError:
        what, _ = self._describe(exc)
        error = ModelRuntimeError(self._scrub(f"chat server {self.url} failed while answering: {what}"))
        logger.debug("%s", error)
        return error

    def _cause(self, exc: BaseException) -> BaseException | None:
        """The exception to chain: none for a refused key, whose server answer may echo (part of) the key."""
        return None if self._describe(exc)[1] == "key" else exc

    # ---- lifecycle ----

    def load(self) -> None:
        """Connect and check that the server answers ``GET /models`` and serves the model. Raises ModelLoadError."""
        import openai

        self.unload()
        client = openai.OpenAI(
            base_url=self.base_url,
            api_key=self._api_key or PLACEHOLDER_KEY,  # always given, so the client never reads OPENAI_API_KEY itself
            timeout=openai.Timeout(self.timeout, connect=self.connect_timeout),
            max_retries=0,
        )
        try:
            served = [str(m.id) for m in client.models.list(timeout=self.connect_timeout).data]
        except (openai.APIError, ValueError) as exc:
            client.close()
            raise self._load_error(exc) from self._cause(exc)
        except Exception as exc:  # the client could not read the answer as a model list (an HTML page, say)
            client.close()
            raise ModelLoadError(
                f"chat server {self.url}: GET /models did not answer with a model list; {ANSWER_HELP}"
            ) from exc
        if not self.model:
            if not served:
                client.close()
                raise ModelLoadError(f"chat server {self.url} lists no model: pass one with --llm-model NAME")
            self.name = served[0]
            logger.info("no chat model named: using %s, the first of %d listed by %s", self.name, len(served), self.url)
        elif self.model in served or f"{self.model}:latest" in served:  # Ollama lists "llama3:latest" for "llama3"
            self.name = self.model
        else:
            client.close()
            listed = ", ".join(served[:20]) + (f" (and {len(served) - 20} more)" if len(served) > 20 else "")
            raise ModelLoadError(
                f"chat server {self.url} does not serve model {self.model!r}; it serves: {listed or 'nothing'} "
                "(pass one of them with --llm-model)"
            )
        self._client = client
        logger.info("chat model %s on %s", self.name, self.url)

    def unload(self) -> None:
        """Close the connections; ``load()`` opens them again. The server keeps its model."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def forget(self, cache_key: str) -> None:
        """Nothing to drop: the server owns its caches (and reuses shared prompt prefixes by itself)."""

    # ---- generation ----

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float,
        should_stop: ShouldStop,
        cache_key: str | None = None,
    ) -> Iterator[GenerationStep]:
        """Yield the answer as the server streams it; the last step has finish_reason "stop", "length" or "cancelled".

        Token counts come from the server's usage report when it sends one (``stream_options.include_usage``);
        otherwise each content delta counts as one token. ``prompt_seconds`` is the time from the request to the first
        content. Raises ModelRuntimeError when the server cannot be reached or answers badly."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        client = self._client
        if client is None:
            raise RuntimeError("OpenAIChatModel used before load()")
        if should_stop():
            yield GenerationStep("", 0, 0, "cancelled")
            return

        started = time.perf_counter()
        try:
            response = client.chat.completions.create(
                model=self.name,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                max_tokens=max_tokens,
                temperature=temperature,
                stream=True,
                stream_options={"include_usage": True},
            )
        except Exception as exc:
            raise self._runtime_error(exc) from self._cause(exc)

        generated = 0  # content deltas seen: the token count when the server sends no usage
        prompt_seconds = 0.0
        finish: str | None = None
        usage: Any = None
        chunks = iter(response)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as exc:
                    if finish is None:
                        raise self._runtime_error(exc) from self._cause(exc)
                    # Only the usage report or [DONE] was still to come: the answer itself is whole.
                    logger.warning("chat server %s: %s after the answer ended", self.url, self._describe(exc)[0])
                    break
                usage = getattr(chunk, "usage", None) or usage
                for choice in getattr(chunk, "choices", None) or ():
                    if getattr(choice, "index", 0) not in (0, None):
                        continue  # only one answer is asked for
                    delta = getattr(choice, "delta", None)
                    text = getattr(delta, "content", None)
                    if isinstance(text, str) and text:
                        generated += 1
                        if not prompt_seconds:
                            prompt_seconds = max(time.perf_counter() - started, 1e-9)
                        yield GenerationStep(text, 0, generated, None, prompt_seconds)
                    finish = getattr(choice, "finish_reason", None) or finish
                # The finish chunk is followed by the usage chunk (when asked for): read on until the stream ends.
                if finish is None and should_stop():
                    response.close()  # the server stops generating when the connection closes
                    logger.debug("ask cancelled after %d deltas; closed the stream to %s", generated, self.url)
                    yield GenerationStep("", 0, generated, "cancelled", prompt_seconds)
                    return
        finally:
            response.close()  # also when the consumer abandons the generator (GeneratorExit)
        if finish is None:
            raise ModelRuntimeError(
                f"chat server {self.url} failed while answering: the answer stream ended without a finish reason "
                f"after {generated} deltas (the server stopped or is not OpenAI-compatible)"
            )
        yield GenerationStep(
            "",
            prompt_tokens=_count(usage, "prompt_tokens", 0),
            generated_tokens=_count(usage, "completion_tokens", generated),
            finish_reason="length" if finish == "length" else "stop",
            prompt_seconds=prompt_seconds or max(time.perf_counter() - started, 1e-9),
            cached_tokens=_count(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0),
        )


def _count(obj: Any, field: str, default: int) -> int:
    value = getattr(obj, field, None) if obj is not None else None
    return value if isinstance(value, int) and value >= 0 else default


def _server_message(exc: Any) -> str:
    """The ``error.message`` (or ``detail``) of an HTTP error body, else the body as text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            for field in ("message", "detail"):
                if isinstance(error.get(field), str):
                    return str(error[field])
        elif isinstance(error, str):
            return error
    if isinstance(body, str) and body.strip():
        return body
    response = getattr(exc, "response", None)
    return str(getattr(response, "reason_phrase", "") or "error")
