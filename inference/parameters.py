"""Checking the decoding parameters of a chat request (OpenAI's and vLLM's names) into the
``params`` a query stores and the runner turns into the engine's ``SamplingParams``.

Every check raises ``ApiError`` (400) naming the field and saying what to send instead. A field
left out stays out of ``params`` (or is stored as None): the engine then takes the model's
generation_config value, as vLLM does.
"""

import re

from django.conf import settings

from config.errors import ApiError
from inference import validation
from inference.engine import constraints

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARACTERS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_TOOLS = 128  # OpenAI's limit
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
REASONING_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise validation.refuse("stop", "'stop' must be a string or a list of up to 4 strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise validation.refuse("stop", f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences; got {len(stops)}.")
    for stop in stops:
        validation.clean_text(stop, "stop")
        if len(stop) > MAX_STOP_CHARACTERS:
            raise validation.refuse("stop", f"Each stop sequence is at most {MAX_STOP_CHARACTERS} characters.")
    return [s for s in stops if s]


def _logit_bias(value) -> dict[str, float]:
    bias = validation.obj(value, "logit_bias") or {}
    checked = {}
    for token, amount in bias.items():
        if not token.isdigit() or len(token) > 9:
            raise validation.refuse("logit_bias", f"'logit_bias' keys are token ids (digits); '{token[:20]}' is not.")
        checked[str(int(token))] = validation.number(amount, "logit_bias", float, -100.0, 100.0, 0.0)
    if len(checked) > 300:  # OpenAI's limit
        raise validation.refuse("logit_bias", "'logit_bias' takes at most 300 tokens.")
    return checked


def _response_format(value) -> dict | None:
    fmt = validation.obj(value, "response_format")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise validation.refuse("response_format", "'response_format.type' must be text, json_object or json_schema.")
    spec = validation.obj(fmt.get("json_schema"), "response_format.json_schema")
    if spec is None or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise validation.refuse(
            "response_format", "'response_format.json_schema' needs a 'name' and a 'schema' (a JSON Schema object)."
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise validation.refuse("response_format", "'response_format.json_schema.schema' must be a JSON Schema object.")
    strict = validation.boolean(spec.get("strict"), "response_format.json_schema.strict")
    return {"type": "json_schema", "json_schema": {"name": spec["name"][:64], "schema": schema, "strict": strict}}


def _tools(value) -> list | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise validation.refuse("tools", f"'tools' must be a list of up to {MAX_TOOLS} function tools.")
    tools, names = [], set()
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise validation.refuse(where, f'\'{where}\' must be {{"type": "function", "function": {{...}}}}.')
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise validation.refuse(
                f"{where}.function.name", f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'."
            )
        if name in names:
            raise validation.refuse(f"{where}.function.name", f"Two tools are named '{name}'; names must differ.")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise validation.refuse(f"{where}.function.parameters", "'parameters' must be a JSON Schema object.")
        description = validation.text(function.get("description"), f"{where}.function.description")
        checked = {"name": name, "parameters": parameters}
        if description:
            checked["description"] = description
        if function.get("strict") is not None:
            checked["strict"] = validation.boolean(function.get("strict"), f"{where}.function.strict")
        tools.append({"type": "function", "function": checked})
    return tools


def _tool_choice(value, tools: list | None):
    if value is None:
        return "auto" if tools else None
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise validation.refuse("tool_choice", "'tool_choice' is 'required' but no 'tools' were given.")
        return value if tools else None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not any(tool["function"]["name"] == name for tool in tools or []):
            raise validation.refuse("tool_choice", f"'tool_choice' names '{str(name)[:64]}', which is not in 'tools'.")
        return {"type": "function", "function": {"name": name}}
    raise validation.refuse(
        "tool_choice",
        '\'tool_choice\' must be none, auto, required or {"type": "function", "function": {"name": ...}}.',
    )


def thinking(body: dict, *, default: bool) -> bool:
    """Thinking on or off: ``chat_template_kwargs.enable_thinking`` (vLLM's way), or
    ``reasoning_effort`` (OpenAI's: none/minimal turn it off; GLM has no levels, so low, medium
    and high all mean on), else the default."""
    kwargs = validation.obj(body.get("chat_template_kwargs"), "chat_template_kwargs") or {}
    for key in kwargs:
        if key != "enable_thinking":
            raise ApiError(
                "unsupported_parameter",
                f"'chat_template_kwargs.{key[:64]}' is not supported; only enable_thinking is.",
                param=f"chat_template_kwargs.{key[:64]}",
            )
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        names = ", ".join(REASONING_EFFORTS)
        raise validation.refuse("reasoning_effort", f"'reasoning_effort' must be one of {names}.")
    if kwargs.get("enable_thinking") is not None:
        return validation.boolean(kwargs["enable_thinking"], "chat_template_kwargs.enable_thinking")
    if effort is not None:
        return REASONING_EFFORTS[effort]
    return default


def decoding(body: dict) -> dict:
    """The checked decoding parameters of an OpenAI-style request, for ``Query.params``."""
    temperature = validation.number(body.get("temperature"), "temperature", float, 0.0, 2.0, None)
    top_k = validation.number(body.get("top_k"), "top_k", int, -1, 1_000_000, None)
    n = validation.number(body.get("n"), "n", int, 1, settings.MAX_N, 1)
    logprobs = validation.boolean(body.get("logprobs"), "logprobs")
    top_logprobs = validation.number(body.get("top_logprobs"), "top_logprobs", int, 0, MAX_TOP_LOGPROBS, 0)
    if top_logprobs and not logprobs:
        raise validation.refuse("top_logprobs", "'top_logprobs' needs 'logprobs': true.")
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    response_format = _response_format(body.get("response_format"))
    if response_format and tool_choice not in (None, "none", "auto"):
        raise validation.refuse("response_format", "'response_format' cannot be combined with a forced 'tool_choice'.")
    try:
        constraints.check(response_format=response_format, tools=tools, tool_choice=tool_choice)
    except constraints.ConstraintError as exc:
        raise validation.refuse(exc.param, str(exc)) from None
    params = {
        "temperature": temperature,
        "top_p": validation.number(body.get("top_p"), "top_p", float, 0.0, 1.0, None),
        "top_k": top_k if top_k not in (-1, 0) else (0 if top_k is not None else None),
        "min_p": validation.number(body.get("min_p"), "min_p", float, 0.0, 1.0, 0.0),
        "repetition_penalty": validation.number(
            body.get("repetition_penalty"), "repetition_penalty", float, 0.01, 2.0, None
        ),
        "presence_penalty": validation.number(body.get("presence_penalty"), "presence_penalty", float, -2.0, 2.0, 0.0),
        "frequency_penalty": validation.number(
            body.get("frequency_penalty"), "frequency_penalty", float, -2.0, 2.0, 0.0
        ),
        "seed": validation.number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1, None),
        "stop": _stop(body.get("stop")),
        "n": n,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "response_format": response_format,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": validation.boolean(body.get("parallel_tool_calls"), "parallel_tool_calls", default=True),
        "enable_thinking": thinking(body, default=settings.CHAT_THINKING_DEFAULT),
    }
    # The sampling values left out are stored as None (the model's generation_config decides), so
    # that they replace the prompt endpoints' documented defaults in the query's params.
    always = ("temperature", "top_p", "top_k", "repetition_penalty")
    return {key: value for key, value in params.items() if value is not None or key in always}
