"""GLM-4.6V's output text, read as it streams: reasoning, answer and tool calls. Plain Python, no torch.

GLM-4.6V-Flash writes ``<think>…</think>`` before its answer when thinking (the default), may wrap
answers in ``<|begin_of_box|>…<|end_of_box|>``, and, given tools, calls them as

    <tool_call>NAME
    <arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>
    …
    </tool_call>

``OutputParser`` turns that text, fed piece by piece as it is decoded, into ``Delta`` s of what has
become certain, reading it as vLLM's ``glm45`` reasoning and tool parsers do:

- reasoning is the text between ``<think>`` and ``</think>`` (an output that never closes it is all
  reasoning from its ``<think>`` on), whatever ``thinking`` says: GLM-4.6V opens the block itself when
  it thinks (its template's prompt ends at ``<|assistant|>``), and an output without ``<think>`` is all
  answer, as vLLM's glm45 reasoning parser reads it (a stray ``</think>`` is dropped);
- box markers are removed (they never reach the client);
- with tools given, each complete ``<tool_call>…</tool_call>`` becomes a ``ToolCall``: a value stays a
  string where the tool's JSON schema says the parameter is a string, else it is read as JSON, falling
  back to the string; a call that is never closed (or has no name) stays answer text, as written;
- whitespace next to the markers is not content: the template strips reasoning and answers when it
  renders them back, so the parser drops it — at the start and end of the reasoning and of the answer,
  and around tool calls (what separates text before a call from text after it is kept).

A piece may end inside a marker (``"<tool_"``): that tail is held back until the next piece (or
``finish()``) decides it. Deltas joined give exactly the totals (``text``, ``reasoning``,
``tool_calls``), so a streamed answer and a whole one are the same.

Decode the model's tokens *with* special tokens for this parser: GLM's markers are special tokens.
GLM's stop tokens (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``) are dropped if they appear.
"""

import json
import re
import secrets

from .request import Delta, ToolCall

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
BOX_MARKERS = ("<|begin_of_box|>", "<|end_of_box|>")
STOP_MARKERS = ("<|endoftext|>", "<|user|>", "<|observation|>")

_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def new_call_id() -> str:
    """A tool call's id in OpenAI's shape: ``call_`` and 24 hex characters."""
    return "call_" + secrets.token_hex(12)


class OutputParser:
    """Reads one choice's output incrementally. ``feed`` each decoded piece, then ``finish`` once."""

    def __init__(self, *, thinking: bool, tools: list | None = None, index: int = 0):
        self.index = index
        self.text = ""  # the answer so far (what the deltas returned)
        self.reasoning = ""
        self.tool_calls: list[ToolCall] = []
        self._schemas = _parameter_schemas(tools) if tools else None  # tool name -> its parameters' schemas
        self._reasoning = False  # which channel text goes to now (see the module's docstring)
        self.thinking = thinking
        self._pending = ""  # text not yet decided: it may be the start of a marker
        self._call: str | None = None  # the body of an open tool call, until its </tool_call>
        self._call_space = ""  # the whitespace before an open tool call: it stays if the call fails
        self._space = ""  # the current channel's trailing whitespace, held until text follows it
        self._fresh = True  # the current channel has said nothing since its marker: leading whitespace goes
        self._out: Delta | None = None
        self._finished = False

    # -- the interface ------------------------------------------------------------------------------
    def feed(self, piece: str) -> Delta:
        """Take the next decoded piece; return what it made certain (possibly nothing)."""
        if self._finished:
            raise RuntimeError("OutputParser.feed() after finish()")
        self._out = Delta(index=self.index)
        self._consume(self._pending + piece)
        return self._out

    def finish(self) -> Delta:
        """The output ended: flush what was held back (an unclosed tool call becomes answer text)."""
        if self._finished:
            raise RuntimeError("OutputParser.finish() called twice")
        self._finished = True
        self._out = Delta(index=self.index)
        pending, self._pending = self._pending, ""
        self._emit(pending)  # only a marker's first characters, never a whole one
        if self._call is not None:
            self._fail_call(CALL_START + self._call)
        self._space = ""  # trailing whitespace of the output
        return self._out

    # -- reading ------------------------------------------------------------------------------------
    def _markers(self) -> tuple[str, ...]:
        markers = (THINK_START, THINK_END, *BOX_MARKERS, *STOP_MARKERS)
        if self._schemas is not None and not self._reasoning:
            markers += (CALL_START,)
        return markers

    def _consume(self, buf: str) -> None:
        self._pending = ""
        while buf:
            if self._call is not None:
                searched = max(0, len(self._call) - len(CALL_END) + 1)
                self._call += buf
                end = self._call.find(CALL_END, searched)
                if end < 0:
                    return  # the call is still open: it decides nothing yet
                body, buf = self._call[:end], self._call[end + len(CALL_END) :]
                self._call = None
                self._close_call(body)
                continue
            markers = self._markers()
            found = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
            if not found:
                held = _marker_prefix_length(buf, markers)
                self._emit(buf[: len(buf) - held])
                self._pending = buf[len(buf) - held :]
                return
            at, marker = min(found)
            self._emit(buf[:at])
            buf = buf[at + len(marker) :]
            self._on_marker(marker)

    def _on_marker(self, marker: str) -> None:
        if marker == THINK_START and not self._reasoning:
            self._switch(reasoning=True)
        elif marker == THINK_END and self._reasoning:
            self._switch(reasoning=False)
        elif marker == CALL_START:
            self._call, self._call_space, self._space = "", self._space, ""
        # anything else (box and stop markers, a stray <think> or </think>) is just removed

    def _switch(self, *, reasoning: bool) -> None:
        """A think marker ends the current channel's text: its held whitespace goes, and the other
        channel starts (fresh if it has said nothing yet)."""
        self._reasoning = reasoning
        self._space = ""
        self._fresh = not (self.reasoning if reasoning else self.text)

    # -- tool calls ---------------------------------------------------------------------------------
    def _close_call(self, body: str) -> None:
        call = self._parse_call(body)
        if call is None:
            self._fail_call(CALL_START + body + CALL_END)
            return
        self.tool_calls.append(call)
        self._out.tool_calls.append(call)
        self._call_space = ""  # it only separated text from the call
        self._space = ""
        self._fresh = not self.text  # after a call, whitespace is kept only between text and text

    def _fail_call(self, raw: str) -> None:
        """Not a tool call after all: it is answer text, as written (with the whitespace before it)."""
        self._call = None
        space, self._call_space = self._call_space, ""
        self._space += space
        self._fresh = False
        self._emit(raw)

    def _parse_call(self, body: str) -> ToolCall | None:
        # The name ends at the first newline (GLM-4.5/4.6) or at the first <arg_key> (newer GLMs).
        cut = min((i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0), default=len(body))
        name = body[:cut].strip()
        if not name or "<" in name or ">" in name:
            return None
        arguments = {}
        for key, value in _ARGUMENT.findall(body[cut:]):
            key = key.strip()
            arguments[key] = self._value(name, key, value.strip())
        return ToolCall(id=new_call_id(), name=name, arguments=json.dumps(arguments, ensure_ascii=False))

    def _value(self, tool: str, key: str, raw: str):
        declared = (self._schemas or {}).get(tool, {}).get(key, {}).get("type")
        kinds = {declared} if isinstance(declared, str) else set(declared or ())
        if kinds == {"string"}:
            return raw
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        if "string" in kinds and not _json_types(value) & kinds:
            return raw  # e.g. {"type": ["string", "null"]} and "42": the string "42"
        return value

    # -- writing ------------------------------------------------------------------------------------
    def _emit(self, piece: str) -> None:
        """Add text to the current channel, dropping its leading whitespace and holding its trailing."""
        if self._fresh:
            piece = piece.lstrip()
        if not piece:
            return
        body = piece.rstrip()
        if not body:
            self._space += piece
            return
        self._fresh = False
        out, self._space = self._space + body, piece[len(body) :]
        if self._reasoning:
            self.reasoning += out
            self._out.reasoning += out
        else:
            self.text += out
            self._out.text += out


def parse_output(text: str, *, thinking: bool, tools: list | None = None) -> Delta:
    """A whole output at once, read exactly as the streaming parser reads it: one Delta with everything."""
    parser = OutputParser(thinking=thinking, tools=tools)
    first, last = parser.feed(text), parser.finish()
    return Delta(
        text=first.text + last.text,
        reasoning=first.reasoning + last.reasoning,
        tool_calls=first.tool_calls + last.tool_calls,
    )


def template_messages(messages: list) -> list:
    """A conversation in the form GLM's chat template renders: tool-call ``arguments`` given as JSON
    text become objects (the template iterates over them; vLLM parses them the same way before
    rendering), and a ``null`` content becomes empty. Raises ``ValueError`` for arguments that are
    not a JSON object."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            message["tool_calls"] = [_call_with_object_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _call_with_object_arguments(call: dict) -> dict:
    function = dict(call.get("function") or call)
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise ValueError(f"tool call '{function.get('name')}': arguments are not valid JSON ({exc})") from exc
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call '{function.get('name')}': arguments must be a JSON object")
    function["arguments"] = arguments
    return {**call, "function": function} if "function" in call else function


def _parameter_schemas(tools: list) -> dict:
    schemas = {}
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not isinstance(function, dict) or not function.get("name"):
            continue
        properties = (function.get("parameters") or {}).get("properties") or {}
        schemas[function["name"]] = {k: v for k, v in properties.items() if isinstance(v, dict)}
    return schemas


def _json_types(value) -> set[str]:
    """The JSON schema types a parsed JSON value satisfies."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"string"} if isinstance(value, str) else {"array"} if isinstance(value, list) else {"object"}


def _marker_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a marker."""
    for size in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-size:]
        if any(marker.startswith(tail) for marker in markers):
            return size
    return 0
