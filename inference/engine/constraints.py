"""Structured outputs: the grammar a query's answer must follow, compiled by llguidance.

``response_format`` (``json_object``, ``json_schema``) and a forced tool call (``tool_choice``
``required`` or a named function) become an llguidance grammar; the engine masks, at every step,
the tokens the grammar does not allow (see ``decoding.Row``).

Why llguidance: it installs here as one self-contained wheel (Rust, no torch or CUDA dependency,
unlike xgrammar, which pulls triton and a TVM runtime), computes masks on the CPU in microseconds,
is maintained by the guidance-ai team and is the structured-output backend of vLLM, SGLang and
llama.cpp; it speaks JSON Schema and Lark, and its Lark names special tokens (``<tool_call>``),
which GLM's tool-call format needs. outlines and lm-format-enforcer were slower on the CPU and
cannot name special tokens.

This module imports llguidance only (no torch): the web tier uses ``check`` to refuse a schema
the engine could not compile, before a request is admitted.
"""

import json

# Compact JSON, as OpenAI's structured outputs write it: no freedom in the whitespace, which a
# random or weak model would otherwise spend its tokens on.
_JSON_OPTIONS = {"whitespace_flexible": False}
# The longest text a forced tool call's string argument may take when its schema sets no maxLength
# (the schema's own maxLength is honoured).
_MAX_STRING_ARGUMENT = 4096


class ConstraintError(ValueError):
    """A response_format or tool the engine cannot enforce; the message names the problem."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _json_schema_grammar(schema: dict) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


def _argument_rule(name: str, spec) -> str:
    """GLM writes each argument as ``<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n``: V is the
    text itself for a string parameter, JSON for any other."""
    spec = spec if isinstance(spec, dict) else {}
    if spec.get("type") == "string" and "enum" not in spec:
        longest = spec.get("maxLength") if isinstance(spec.get("maxLength"), int) else _MAX_STRING_ARGUMENT
        value = f"/[^<]{{{int(spec.get('minLength') or 0)},{longest}}}/"
    elif spec.get("type") == "string":
        value = " | ".join(_lark_string(str(v)) for v in spec["enum"])
        value = f"({value})"
    else:
        value = f"%json {json.dumps(spec or {})}"
    return f'<arg_key> {_lark_string(name)} </arg_key> "\\n" <arg_value> {value} </arg_value> "\\n"'


def _call_rule(function: dict) -> str:
    """One call of ``function``: its required arguments in the schema's order (the optional ones
    are left to the model's own judgement only when it is not forced)."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = [name for name in parameters.get("required") or [] if name in properties]
    arguments = " ".join(_argument_rule(name, properties[name]) for name in required)
    return f'<tool_call> {_lark_string(function["name"])} "\\n" {arguments} </tool_call>'


def _tool_grammar(tools: list, name: str | None) -> str:
    import llguidance

    functions = [tool["function"] for tool in tools if name is None or tool["function"]["name"] == name]
    calls = " | ".join(f"({_call_rule(function)})" for function in functions)
    # "required": one call or more; a named function: exactly one call of it.
    lark = f"start: call{'' if name else '+'}\ncall: {calls}\n"
    return llguidance.LLMatcher.grammar_from_lark(lark)


def grammar_for(*, response_format: dict | None, tools: list | None, tool_choice) -> str | None:
    """The llguidance grammar of a request, or None when its output is free."""
    if isinstance(tool_choice, dict):
        return _tool_grammar(tools or [], tool_choice["function"]["name"])
    if tool_choice == "required" and tools:
        return _tool_grammar(tools, None)
    if not response_format or response_format.get("type") == "text":
        return None
    if response_format["type"] == "json_object":
        return _json_schema_grammar({"type": "object"})
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    return _json_schema_grammar(schema)


def check(*, response_format: dict | None, tools: list | None, tool_choice) -> None:
    """Raise ConstraintError when the grammar of a request cannot be compiled (a bad schema)."""
    import llguidance

    try:
        grammar = grammar_for(response_format=response_format, tools=tools, tool_choice=tool_choice)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConstraintError(f"The structured-output request could not be compiled: {exc}", "response_format") from exc
    if grammar is None:
        return
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if failed:
        param = "tools" if tool_choice not in (None, "none", "auto") else "response_format"
        detail = "; ".join(str(m) for m in messages)[:400] or "unknown error"
        raise ConstraintError(f"The schema cannot be enforced: {detail}.", param)
