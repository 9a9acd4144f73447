"""The ``openai`` backend: an engine server beside the worker (vLLM, SGLang, or any OpenAI-compatible
server) generates; the worker sends it each query as a streaming chat completion and relays what
comes back as the in-process engine's ``Delta`` s and ``Result``, so the runner, the channel layer and
everything above stay as they are.

- The request: the conversation (images as PNG data URIs, tool calls and tool results as OpenAI
  writes them), and every parameter the chat semantics take — ``max_tokens``, ``temperature``,
  ``top_p``, ``seed``, ``stop``, ``n``, ``logprobs``/``top_logprobs``, the penalties, ``logit_bias``,
  ``response_format``, ``tools``/``tool_choice``, vLLM's ``top_k``/``min_p``/``repetition_penalty``
  when a request sets them, and the reasoning switch as vLLM takes it
  (``chat_template_kwargs: {"enable_thinking": …}``). A value a request left out is not sent: the
  server takes the model's generation_config, as the in-process engine does.
- The answer: ``content``, ``reasoning_content`` (or vLLM's newer ``reasoning``) and ``tool_calls``
  deltas. Everything goes through the same GLM output parser as the in-process engine's tokens
  (reasoning is fed to it between think markers), so the text, reasoning and tool calls a client
  sees are the same whichever backend ran: a server started without vLLM's glm45 parsers (raw GLM
  text with ``<think>`` and ``<tool_call>`` kept) is read exactly as our own engine reads its tokens.
  Token counts come from the server's ``usage`` (``stream_options.include_usage``).
- Cancelling closes the upstream stream (vLLM and SGLang abort a request whose client left).
- Errors keep their meaning: the server's 400/422 is ``invalid_request`` with its message; refused
  connections, 503 and the like are ``model_unavailable``; a stream that breaks mid-answer is
  ``engine_error`` (the runner keeps the partial answer); an out-of-memory is ``gpu_oom``.
- A monitor thread asks the server's ``/health`` and ``/v1/models`` every ``probe_seconds``:
  ``loaded`` (the worker's ``model_loaded``) is true only while the server is healthy and serves
  the expected model; ``wait_ready`` blocks (bounded) until it is.

Plain Python and httpx: importing this module imports neither torch nor transformers.
"""

import base64
import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from inference.engine.core import EngineError
from inference.engine.output import THINK_END, THINK_START, OutputParser, new_call_id
from inference.engine.request import Choice, Delta, EngineRequest, Result, ToolCall

logger = logging.getLogger("sightline.engine")

_ERROR_TEXT_LIMIT = 500


def base_url(url: str) -> str:
    """The server's root: ``http://host:8001/v1/`` and ``http://host:8001`` both give ``http://host:8001``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# --- the request ----------------------------------------------------------------------------------
def data_uri(image) -> str:
    """A PIL image as a PNG data URI (lossless: the server sees the pixels the in-process engine would)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _openai_call(call: dict) -> dict:
    """A stored tool call in OpenAI's shape, its ``arguments`` JSON text."""
    function = dict(call.get("function") or call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {
        "id": call.get("id") or new_call_id(),
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": arguments},
    }


def openai_messages(request: EngineRequest) -> list[dict]:
    """The conversation as OpenAI's chat messages: the k-th ``{"type": "image"}`` part becomes
    ``images[k]`` as a data URI."""
    images = iter(request.images)
    messages = []
    for message in request.messages:
        out = {key: value for key, value in message.items() if key not in ("content", "tool_calls")}
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    parts.append({"type": "image_url", "image_url": {"url": data_uri(next(images))}})
                elif isinstance(part, dict) and part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
            content = parts
        out["content"] = content
        if message.get("tool_calls"):
            out["tool_calls"] = [_openai_call(call) for call in message["tool_calls"]]
        messages.append(out)
    return messages


def request_body(request: EngineRequest, model: str) -> dict:
    """The chat completion the server is asked for (streamed, with usage)."""
    sampling = request.sampling
    body: dict = {
        "model": model,
        "messages": openai_messages(request),
        "stream": True,
        # continuous_usage_stats (vLLM, SGLang): usage in every chunk, so a cancelled or broken
        # stream still knows its prompt tokens; servers without it send usage once at the end.
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "max_tokens": sampling.max_new_tokens,
        "chat_template_kwargs": {"enable_thinking": request.enable_thinking},
    }
    optional = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
        "n": sampling.n if sampling.n != 1 else None,
        "logprobs": True if sampling.logprobs else None,
        "top_logprobs": sampling.top_logprobs if sampling.logprobs and sampling.top_logprobs else None,
        "presence_penalty": sampling.presence_penalty or None,
        "frequency_penalty": sampling.frequency_penalty or None,
        "logit_bias": {str(token): bias for token, bias in sampling.logit_bias} or None,
        "response_format": request.response_format,
        "tools": request.tools,
        "tool_choice": request.tool_choice if request.tools else None,
        # vLLM's (and SGLang's) extra sampling parameters, only when the request set them
        "top_k": sampling.top_k,
        "min_p": sampling.min_p or None,
        "repetition_penalty": sampling.repetition_penalty,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return body


# --- errors ---------------------------------------------------------------------------------------
def _message_of(payload, fallback: str = "") -> str:
    """The message of an error body, whatever the server's shape: OpenAI's ``{"error": {"message"}}``,
    vLLM's older ``{"message"}``, FastAPI's ``{"detail"}`` (text or a list of problems), or text."""
    if isinstance(payload, dict):
        for key in ("error", "detail", "message"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("msg") or json.dumps(value)
            elif isinstance(value, list):
                value = "; ".join(
                    (item.get("msg") if isinstance(item, dict) else str(item)) or str(item) for item in value
                )
            if value:
                return str(value)[:_ERROR_TEXT_LIMIT]
    if isinstance(payload, str) and payload.strip():
        return payload.strip()[:_ERROR_TEXT_LIMIT]
    return fallback


def _is_oom(message: str) -> bool:
    text = message.lower()
    return "out of memory" in text or "outofmemory" in text


def error_for_status(status: int, payload, *, url: str, model: str) -> EngineError:
    """The server's refusal of a request, as the error a client gets."""
    message = _message_of(payload, f"HTTP {status}")
    if _is_oom(message):
        return EngineError("gpu_oom", f"The engine server ran out of GPU memory on this query: {message}")
    if status in (400, 413, 422):
        return EngineError("invalid_request", message)
    if status == 404:
        return EngineError("model_unavailable", f"The engine server at {url} does not serve '{model}': {message}")
    if status in (401, 403):
        return EngineError(
            "model_unavailable", f"The engine server at {url} refused the worker (INFERENCE_ENGINE_API_KEY): {message}"
        )
    if status in (408, 429, 503):
        return EngineError("model_unavailable", f"The engine server at {url} is not taking queries now: {message}")
    return EngineError("engine_error", f"The engine server failed (HTTP {status}): {message}")


def error_in_stream(payload) -> EngineError:
    """An error event in the middle of a stream (vLLM, transformers serve: ``data: {"error": …}``)."""
    message = _message_of(payload, "the engine server reported an error")
    if _is_oom(message):
        return EngineError("gpu_oom", f"The engine server ran out of GPU memory on this query: {message}")
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if code in (400, "400") or (isinstance(error, dict) and error.get("type") == "BadRequestError"):
        return EngineError("invalid_request", message)
    return EngineError("engine_error", f"The engine server failed mid-answer: {message}")


# --- the answer -----------------------------------------------------------------------------------
def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders), summing exactly to it."""
    if not weights:
        return []
    if len(weights) == 1:
        return [total]
    whole = sum(weights)
    if whole <= 0:
        weights, whole = [1] * len(weights), len(weights)
    shares = [total * w // whole for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (total * weights[i]) % whole, reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


class _ChoiceReader:
    """One choice's deltas from the server, read into our ``Delta`` s through the GLM output parser."""

    def __init__(self, index: int, *, thinking: bool, tools: list | None, logprobs: bool):
        self.index = index
        self.parser = OutputParser(thinking=thinking, tools=tools, index=index)
        self.with_logprobs = logprobs
        self.in_reasoning = False  # the server's reasoning is fed to the parser between think markers
        self.tool_calls: list[ToolCall] = []
        self.entries: list[dict] = []
        self.open_calls: dict[int, dict] = {}  # the server's streamed tool calls, by their index
        self.finish_reason = ""
        self.ended = False
        self.pieces = 0  # chunks that carried output (token counts when the server gives none per choice)
        self.reasoning_pieces = 0

    def _out(self, delta: Delta, made: Delta) -> None:
        delta.text += made.text
        delta.reasoning += made.reasoning
        delta.tool_calls.extend(made.tool_calls)
        self.tool_calls.extend(made.tool_calls)

    def _close_calls(self, delta: Delta, below: int | None = None) -> None:
        """Streamed tool calls that are complete: those before index ``below``, or all."""
        for number in sorted(self.open_calls):
            if below is not None and number >= below:
                continue
            call = self.open_calls.pop(number)
            arguments = call["arguments"] or "{}"
            try:  # as the in-process parser writes it
                arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
            except ValueError:
                pass
            made = ToolCall(id=call["id"] or new_call_id(), name=call["name"], arguments=arguments)
            delta.tool_calls.append(made)
            self.tool_calls.append(made)

    def feed(self, choice: dict) -> Delta:
        delta = Delta(index=self.index)
        piece = choice.get("delta") or {}
        reasoning = piece.get("reasoning_content") or piece.get("reasoning") or ""
        content = piece.get("content") or ""
        if reasoning:
            self.reasoning_pieces += 1
            if not self.in_reasoning:
                self.in_reasoning = True
                reasoning = THINK_START + reasoning
            self._out(delta, self.parser.feed(reasoning))
        if content:
            if self.in_reasoning:
                self.in_reasoning = False
                content = THINK_END + content
            self._out(delta, self.parser.feed(content))
        for call in piece.get("tool_calls") or []:
            number = call.get("index", len(self.open_calls))
            self._close_calls(delta, below=number)  # a later call started: the earlier ones are whole
            function = call.get("function") or {}
            entry = self.open_calls.setdefault(number, {"id": "", "name": "", "arguments": ""})
            entry["id"] = entry["id"] or call.get("id") or ""
            entry["name"] += function.get("name") or ""
            entry["arguments"] += function.get("arguments") or ""
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        if self.with_logprobs and logprobs:
            delta.logprobs = list(logprobs)
            self.entries.extend(logprobs)
        if reasoning or content or piece.get("tool_calls") or logprobs:
            self.pieces += max(1, len(logprobs))
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self._finish(delta)
        return delta

    def _finish(self, delta: Delta) -> None:
        if self.ended:
            return
        self.ended = True
        if self.in_reasoning:
            self.in_reasoning = False
            self._out(delta, self.parser.feed(THINK_END))
        self._out(delta, self.parser.finish())
        self._close_calls(delta)

    def end(self, reason: str) -> Delta:
        """The stream ended (cancelled, or broken) before this choice finished."""
        delta = Delta(index=self.index)
        if not self.finish_reason:
            self.finish_reason = reason
        self._finish(delta)
        return delta

    def choice(self, completion_tokens: int, reasoning_tokens: int) -> Choice:
        reason = {"abort": "cancelled"}.get(self.finish_reason, self.finish_reason) or "length"
        if reason not in ("stop", "length", "tool_calls", "cancelled"):
            reason = "stop"
        if reason == "stop" and self.tool_calls:
            reason = "tool_calls"
        return Choice(
            index=self.index,
            text=self.parser.text,
            reasoning=self.parser.reasoning,
            tool_calls=list(self.tool_calls),
            finish_reason=reason,
            completion_tokens=completion_tokens,
            reasoning_tokens=reasoning_tokens,
            logprobs=self.entries if self.with_logprobs else None,
        )


class StreamReader:
    """A whole streamed answer (every choice): ``feed`` each chunk, ``end`` once, then ``result()``."""

    def __init__(self, request: EngineRequest):
        self.request = request
        self.tools = request.tools if request.tools and request.tool_choice != "none" else None
        self.choices: dict[int, _ChoiceReader] = {}
        self.usage: dict | None = None
        self._choice(0)  # the others as the server sends them (one that ignores `n` sends one)

    def _choice(self, index: int) -> _ChoiceReader:
        if index not in self.choices:
            self.choices[index] = _ChoiceReader(
                index, thinking=self.request.enable_thinking, tools=self.tools, logprobs=self.request.sampling.logprobs
            )
        return self.choices[index]

    def feed(self, chunk: dict) -> list[Delta]:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        out = []
        for choice in chunk.get("choices") or []:
            delta = self._choice(int(choice.get("index", 0))).feed(choice)
            if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs:
                out.append(delta)
        return out

    @property
    def finished(self) -> bool:
        """Every choice the server sent has its finish reason (the server's answer is whole)."""
        return all(choice.finish_reason for choice in self.choices.values())

    @property
    def missing_choices(self) -> int:
        """Choices asked for (``n``) that the server never sent: it does not take ``n``."""
        return max(0, self.request.sampling.n - len(self.choices))

    def end(self, reason: str) -> list[Delta]:
        out = []
        for choice in self.choices.values():
            delta = choice.end(reason)
            if delta.text or delta.reasoning or delta.tool_calls:
                out.append(delta)
        return out

    def result(self) -> Result:
        readers = [self.choices[index] for index in sorted(self.choices)]
        usage = self.usage or {}
        pieces = [reader.pieces for reader in readers]
        completion = usage.get("completion_tokens")
        completion = int(completion) if isinstance(completion, int) else sum(pieces)
        tokens = _split(completion, pieces)
        details = usage.get("completion_tokens_details") or {}
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        if isinstance(reasoning, int):
            reasoning_tokens = _split(reasoning, [reader.reasoning_pieces for reader in readers])
        else:  # not reported: a reasoning piece is a token, as vLLM streams them
            reasoning_tokens = [min(r.reasoning_pieces, t) for r, t in zip(readers, tokens, strict=True)]
        prompt = usage.get("prompt_tokens")
        return Result(
            choices=[reader.choice(t, r) for reader, t, r in zip(readers, tokens, reasoning_tokens, strict=True)],
            prompt_tokens=int(prompt) if isinstance(prompt, int) else 0,
        )


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


# --- the engine -----------------------------------------------------------------------------------
class RemoteGeneration:
    """One query's answer from the engine server. Iterate for its ``Delta`` s (the request is made
    then, in the iterating thread); afterwards ``result`` is its ``Result``. Errors are raised from
    the iteration as ``EngineError``."""

    def __init__(self, engine: "RemoteEngine", request: EngineRequest, should_stop=None):
        self.engine = engine
        self.request = request
        self.should_stop = should_stop
        self.result: Result | None = None

    def __iter__(self) -> Iterator[Delta]:
        import httpx

        engine = self.engine
        reader = StreamReader(self.request)
        body = request_body(self.request, engine.model)
        deadline = time.monotonic() + engine.time_limit
        cancelled = False
        engine._started()
        try:
            engine.check_model()
            if self.should_stop is not None and self.should_stop():
                cancelled = True
            else:
                with engine.client.stream("POST", engine.url + "/v1/chat/completions", json=body) as response:
                    if response.status_code != 200:
                        raise engine._refusal(response)
                    for event in sse_events(response.iter_lines()):
                        if event.strip() == "[DONE]":
                            break
                        try:
                            chunk = json.loads(event)
                        except ValueError:
                            raise EngineError(
                                "engine_error", f"The engine server sent something unreadable: {event[:200]!r}"
                            ) from None
                        if not isinstance(chunk, dict):
                            continue
                        if chunk.get("error"):
                            raise error_in_stream(chunk)
                        yield from reader.feed(chunk)
                        if self.should_stop is not None and self.should_stop():
                            cancelled = True  # leaving the block closes the stream: the server aborts it
                            break
                        if time.monotonic() > deadline:
                            raise EngineError(
                                "engine_error",
                                f"The engine server did not finish within {engine.time_limit:g} s "
                                "(INFERENCE_SOFT_TIME_LIMIT).",
                            )
            if not cancelled and not reader.finished:
                engine.poke()
                raise EngineError("engine_error", "The engine server ended the answer before it was complete.")
            if not cancelled and reader.missing_choices:
                logger.warning(
                    "the engine server at %s answered %d of the %d choices asked for (it does not take `n`)",
                    engine.url,
                    len(reader.choices),
                    self.request.sampling.n,
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            engine.poke()
            raise EngineError(
                "model_unavailable", f"The engine server at {engine.url} cannot be reached: {exc or type(exc).__name__}"
            ) from None
        except httpx.TimeoutException as exc:
            raise EngineError(
                "engine_error", f"The engine server stopped answering ({type(exc).__name__}): {exc}"
            ) from None
        except httpx.HTTPError as exc:  # the connection broke mid-answer: the engine died or restarted
            engine.poke()
            raise EngineError(
                "engine_error", f"The engine server failed mid-answer ({type(exc).__name__}): {exc}"
            ) from None
        finally:
            engine._ended()
        yield from reader.end("cancelled" if cancelled else "length")
        self.result = reader.result()
        engine._count(self.result.completion_tokens)


class RemoteEngine:
    """An engine server as the runner's engine: ``stream`` as ``Engine.stream`` does, ``loaded`` while
    the server is healthy and serves ``model``. Shared by all of a worker's threads."""

    backend = "openai"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str = "",
        max_inflight: int = 64,
        probe_seconds: float = 2.0,
        time_limit: float = 300.0,
        connect_timeout: float = 5.0,
    ):
        import httpx

        self.url = base_url(url)
        self.model = model
        self.model_id = model
        self.device = "remote"
        self.dtype = ""
        self.scheduler = None
        self.time_limit = time_limit
        self.probe_seconds = probe_seconds
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            # No read limit between two chunks beyond the query's own time limit: a long prefill
            # or a full server queue is slow, not dead (a dead one closes the connection).
            timeout=httpx.Timeout(connect=connect_timeout, read=time_limit, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=max_inflight + 4, max_keepalive_connections=max_inflight + 4),
        )
        self._probe_client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(5.0, connect=min(2.0, connect_timeout))
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state: dict = {"healthy": False, "served": [], "error": "not asked yet", "checked": 0.0}
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.inflight = 0
        self.max_inflight_seen = 0
        self._done: deque = deque()  # (when, tokens) of recent answers, for tokens/s

    # --- readiness ---------------------------------------------------------------------------
    def probe(self) -> dict:
        """Ask the server now: its ``/health``, and the models its ``/v1/models`` lists."""
        import httpx

        state: dict = {"healthy": False, "served": [], "error": "", "checked": time.time()}
        try:
            health = self._probe_client.get(self.url + "/health")
            models = self._probe_client.get(self.url + "/v1/models")
        except httpx.HTTPError as exc:
            state["error"] = f"cannot reach {self.url}: {type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
            return state
        if models.status_code == 200:
            try:
                state["served"] = [m.get("id") for m in models.json().get("data", []) if isinstance(m, dict)]
            except ValueError:
                pass
        if health.status_code not in (200, 404) or (health.status_code == 404 and models.status_code != 200):
            state["error"] = f"/health answered {health.status_code}: {_message_of(_json_or_text(health))}"
        elif models.status_code != 200:
            state["error"] = f"/v1/models answered {models.status_code}: {_message_of(_json_or_text(models))}"
        elif self.model not in state["served"]:
            state["healthy"] = True
            state["error"] = f"serves {', '.join(map(str, state['served'])) or 'no model'}, not '{self.model}'"
        else:
            state["healthy"] = True
        return state

    def _record(self, state: dict) -> None:
        with self._changed:
            was = self._ready(self._state)
            self._state = state
            self._changed.notify_all()
        now = self._ready(state)
        if was != now:
            if now:
                logger.info("engine server %s is ready, serving %s", self.url, self.model)
            else:
                logger.warning("engine server %s is not ready: %s", self.url, state["error"])

    def _ready(self, state: dict) -> bool:
        return bool(state["healthy"]) and self.model in state["served"]

    def check_model(self) -> None:
        """Refuse to send a query to a server known to serve another model (it would answer with
        another model, or refuse the name with an error that would read as the client's)."""
        with self._lock:
            state = dict(self._state)
        if state["healthy"] and self.model not in state["served"]:
            raise EngineError("model_unavailable", f"The engine server at {self.url} {state['error']}.")

    @property
    def loaded(self) -> bool:
        """True while the engine server is healthy and serves the model (the worker's ``model_loaded``)."""
        with self._lock:
            return self._ready(self._state)

    def status(self) -> dict:
        """For the heartbeat and /health/ready."""
        with self._lock:
            state = dict(self._state)
        return {
            "backend": self.backend,
            "url": self.url,
            "model": self.model,
            "healthy": state["healthy"],
            "served_models": state["served"],
            "ready": self._ready(state),
            "error": state["error"],
            "checked": state["checked"],
            "inflight": self.inflight,
        }

    def start_monitor(self) -> "RemoteEngine":
        """Probe the server every ``probe_seconds`` (and at once after a failure) in a thread of its own."""
        if self._monitor is None:
            self._record(self.probe())
            self._monitor = threading.Thread(target=self._watch, name="sightline-engine-monitor", daemon=True)
            self._monitor.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._poke.wait(self.probe_seconds)
            self._poke.clear()
            if self._stop.is_set():
                return
            try:
                self._record(self.probe())
            except Exception:  # never lose the monitor
                logger.exception("probing the engine server failed")

    def poke(self) -> None:
        """Probe again now (a query just failed to reach the server)."""
        self._poke.set()

    def wait_ready(self, timeout: float, *, log_every: float = 10.0) -> bool:
        """Wait until the server is ready, at most ``timeout`` seconds, saying why every ``log_every``."""
        deadline = time.monotonic() + timeout
        next_log = time.monotonic()
        with self._changed:
            while not self._ready(self._state):
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_log:
                    logger.warning(
                        "waiting for the engine server at %s (%s); %.0f s left",
                        self.url,
                        self._state["error"],
                        deadline - now,
                    )
                    next_log = now + log_every
                self._changed.wait(min(deadline - now, max(0.05, next_log - now)))
            return True

    def close(self) -> None:
        self._stop.set()
        self._poke.set()
        self.client.close()
        self._probe_client.close()

    # --- generating --------------------------------------------------------------------------
    def enable_batching(self, **_options) -> None:
        """The engine server batches: nothing to do here."""

    def stream(self, request: EngineRequest, should_stop: Callable[[], bool] | None = None) -> RemoteGeneration:
        return RemoteGeneration(self, request, should_stop)

    def generate(self, request: EngineRequest, should_stop=None) -> Result:
        generation = self.stream(request, should_stop)
        for _ in generation:
            pass
        return generation.result

    def _refusal(self, response) -> EngineError:
        response.read()
        error = error_for_status(response.status_code, _json_or_text(response), url=self.url, model=self.model)
        if error.code == "model_unavailable":
            self.poke()
        return error

    def _started(self) -> None:
        with self._lock:
            self.inflight += 1
            self.max_inflight_seen = max(self.max_inflight_seen, self.inflight)

    def _ended(self) -> None:
        with self._lock:
            self.inflight -= 1

    def _count(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._done.append((now, tokens))
            while self._done and self._done[0][0] < now - 10:
                self._done.popleft()

    def batch_info(self) -> dict:
        """What the heartbeat and /metrics show of a worker's batching: with an engine server, the
        queries in flight there now, the most so far, and the tokens/s of the last 10 s."""
        now = time.monotonic()
        with self._lock:
            tokens = sum(t for when, t in self._done if when >= now - 10)
            return {
                "batch_rows": self.inflight,
                "max_batch_rows": self.max_inflight_seen,
                "tokens_per_second": round(tokens / 10, 1),
            }

    def translate_error(self, exc: BaseException) -> EngineError:
        if isinstance(exc, EngineError):
            return exc
        return EngineError("internal_error", f"Generation failed: {type(exc).__name__}")


def _json_or_text(response):
    try:
        return response.json()
    except ValueError:
        return response.text
