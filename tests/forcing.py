"""Forced outputs for tests: the tiny model's weights are random, so to make it say something
specific a test puts a marker in its conversation, and the engine's test-only hook
(``SIGHTLINE_TEST_FORCE_OUTPUT``, inference/engine/decoding.py) forces the tokens of the text
below through the real generation path: sampling, stop strings, detokenization, GLM's output
parser, streaming and storage all run as in production; only the token choice is forced. conftest
sets the variable for the whole session (the live stack's processes inherit it)."""

STOP = "[force:stop]"
TOOL_CALL = "[force:tool-call]"
TWO_TOOL_CALLS = "[force:two-tool-calls]"
REASONING = "[force:reasoning]"
BOX = "[force:box]"

FORCED = {
    STOP: "alpha beta STOP gamma delta",
    TOOL_CALL: (
        "I will look it up.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
    ),
    TWO_TOOL_CALLS: (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    ),
    REASONING: "<think>The picture is red, so the answer is red.</think><|begin_of_box|>Red<|end_of_box|>",
    BOX: "The answer: <|begin_of_box|>42<|end_of_box|>",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {
            "type": "object",
            # maxLength: a forced call's string is bounded by its schema (a random model never ends one)
            "properties": {"city": {"type": "string", "maxLength": 24}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


# A query whose prompt holds this marker decodes one token per 50 ms (inference.engine's test-only
# SLOW_TEST_MARKER_ENV): a test can act while it surely still runs (400 tokens: 20 s).
SLOW = "[slow-steps]"
