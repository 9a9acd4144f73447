"""GLM-4.6V-Flash's formats: the tiny model's special tokens, chat template and generation config, and
the parser of GLM's output text (reasoning, box markers, tool calls).

The expected prompts below are what GLM-4.6V-Flash's published chat template renders for the same
conversations (written out by hand, checked against that template's own rendering)."""

import json
import random
import re

import pytest

from inference.engine.output import OutputParser, new_call_id, parse_output, template_messages
from inference.engine.request import Delta
from inference.engine.tiny_model import EOS_TOKENS, GENERATION_DEFAULTS, SPECIAL_TOKENS

TOOLS_PREAMBLE = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_INSTRUCTIONS = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir))


def render(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- the tiny model's tokens, generation config and template ------------------------------------------------------
def test_each_special_token_is_one_token_in_the_published_order(processor):
    tokenizer = processor.tokenizer
    ids = []
    for token in SPECIAL_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        assert len(encoded) == 1, f"{token} is {len(encoded)} tokens"
        assert tokenizer.decode(encoded, skip_special_tokens=False) == token
        ids.append(encoded[0])
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # numbered in GLM's order
    for marker in ("<tool_call>", "</arg_value>", "<|begin_of_box|>", "<think>", "/nothink", "<|observation|>"):
        assert marker in SPECIAL_TOKENS
    # inside text too: a marker next to ordinary characters is still its one token
    encoded = tokenizer.encode("ok<tool_call>x\n<arg_key>k</arg_key>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in encoded
    assert tokenizer.convert_tokens_to_ids("<arg_key>") in encoded


def test_generation_config_is_the_published_one(tiny_model_dir):
    from transformers import AutoTokenizer, GenerationConfig

    config = GenerationConfig.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert GENERATION_DEFAULTS == {
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.6,
        "top_k": 2,
        "repetition_penalty": 1.1,
    }
    for name, value in GENERATION_DEFAULTS.items():
        assert getattr(config, name) == value
    assert config.eos_token_id == [tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS]
    assert config.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert set(config.eos_token_id) <= set(config.suppress_tokens)  # test-only: the tiny model never stops


def test_tiny_model_is_still_small_and_recognised(tiny_model_dir):
    from inference.engine.tiny_model import is_built, is_tiny_model

    assert is_built(tiny_model_dir) and is_tiny_model(tiny_model_dir)
    assert sum(f.stat().st_size for f in tiny_model_dir.iterdir()) < 1024 * 1024
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    assert "zai-org/GLM-4.6V-Flash" in template and "MIT" in template  # the credit travels with it


def test_thinking_is_on_by_default_and_enable_thinking_false_turns_it_off(processor):
    messages = [{"role": "user", "content": "hello"}]
    assert render(processor, messages) == "[gMASK]<sop><|user|>\nhello<|assistant|>\n"
    assert render(processor, messages, enable_thinking=True) == "[gMASK]<sop><|user|>\nhello<|assistant|>\n"
    assert (
        render(processor, messages, enable_thinking=False)
        == "[gMASK]<sop><|user|>\nhello/nothink<|assistant|>\n<think></think>\n"
    )
    # a user turn already ending in /nothink does not get it twice
    assert render(processor, [{"role": "user", "content": "hi /nothink"}], enable_thinking=False).count("/nothink") == 1


def test_system_images_and_history(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>r1</think>\na1"},  # history before the last user turn
        {"role": "user", "content": [{"type": "text", "text": "q2"}, {"type": "image"}, {"type": "image"}]},
    ]
    assert render(processor, messages, enable_thinking=False) == (
        "[gMASK]<sop><|system|>\nBe brief.<|user|>\nq1/nothink<|assistant|>\n<think></think>\na1"
        f"<|user|>\nq2{IMAGE}{IMAGE}/nothink<|assistant|>\n<think></think>\n"
    )
    # parts in their order, video too; reasoning after the last user turn is kept (stripped)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video"}]},
        {"role": "assistant", "content": " a1 ", "reasoning_content": "\nr1\n"},
    ]
    assert processor.apply_chat_template(messages, tokenize=False) == (
        f"[gMASK]<sop><|user|>\n{IMAGE}and<|begin_of_video|><|video|><|end_of_video|>"
        "<|assistant|>\n<think>r1</think>\na1"
    )


def test_tools_tool_calls_and_observations(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Weather here?"}]},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "The user wants weather.",
            "tool_calls": [
                call("get_weather", {"city": "Paris", "days": 2}),
                call("get_weather", {"city": "Nice", "units": {"t": "C"}}, "call_2"),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    tool_json = json.dumps(WEATHER, ensure_ascii=False)
    expected = (
        f"[gMASK]<sop>{TOOLS_PREAMBLE}{tool_json}\n{TOOLS_INSTRUCTIONS}<|system|>\nBe brief."
        f"<|user|>\n{IMAGE}Weather here?<|assistant|>\n<think>The user wants weather.</think>\nLet me check."
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
        "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Nice</arg_value>\n"
        '<arg_key>units</arg_key>\n<arg_value>{"t": "C"}</arg_value>\n</tool_call>'
        "<|observation|>\n<tool_response>\nsunny\n</tool_response>\n\n<tool_response>\nrain\n</tool_response>\n"
        "<|assistant|>\n"
    )
    assert render(processor, messages, tools=[WEATHER]) == expected
    assert render(processor, messages, tools=[WEATHER], enable_thinking=False) == (
        expected.replace("Weather here?", "Weather here?/nothink") + "<think></think>\n"
    )
    # no tools, no tools block
    assert "# Tools" not in render(processor, messages)


def test_tool_call_arguments_as_json_text_and_null_content(processor):
    as_objects = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris", "days": 2})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    as_text = [dict(m) for m in as_objects]
    as_text[1] = {**as_text[1], "content": None, "tool_calls": [call("get_weather", '{"city": "Paris", "days": 2}')]}
    assert render(processor, template_messages(as_text)) == render(processor, as_objects)
    assert "None" not in render(processor, template_messages(as_text))
    with pytest.raises(Exception, match="arguments must be an object"):
        render(processor, as_text)  # the template cannot read JSON text: template_messages must run first
    with pytest.raises(ValueError, match="not valid JSON"):
        template_messages([{"role": "assistant", "tool_calls": [call("f", "{oops")]}])
    with pytest.raises(ValueError, match="JSON object"):
        template_messages([{"role": "assistant", "tool_calls": [call("f", "[1]")]}])
    assert template_messages(as_text)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    assert as_text[1]["content"] is None  # the caller's messages are left alone


def test_markers_are_single_tokens_in_a_rendered_prompt_with_images(processor):
    from PIL import Image

    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    messages = template_messages(
        [
            {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "q"}]},
            {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city": "Paris"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    )
    inputs = processor.apply_chat_template(
        messages, tools=[WEATHER], add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=False
    )
    ids = list(inputs["input_ids"][0])
    tokenizer = processor.tokenizer

    def count(token):
        return ids.count(tokenizer.convert_tokens_to_ids(token))

    # the tools block's example names each marker once; the history adds its own
    assert count("<tool_call>") == 2 and count("</tool_call>") == 2
    assert count("<arg_key>") == 3 and count("<arg_value>") == 3
    assert count("<tool_response>") == 1 and count("<|observation|>") == 1
    assert count("<think>") == 2 and count("</think>") == 2 and count("/nothink") == 1
    assert count("<|begin_of_image|>") == 1 and count("<|end_of_image|>") == 1
    assert count("<|image|>") == int(inputs["image_grid_thw"].prod()) // 4  # one per merged 2x2 patch
    assert ids[:2] == [tokenizer.convert_tokens_to_ids("[gMASK]"), tokenizer.convert_tokens_to_ids("<sop>")]


def test_forced_markers_come_out_of_the_tiny_model_and_parse(tiny_model_dir, processor):
    """The tiny model can emit GLM's markers (one token each) despite its test-only suppression, when a
    logits processor forces them — the way end-to-end tests make it say something — and the parser
    reads the result, fed token by token as a stream would be."""
    import torch
    from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

    tokenizer = processor.tokenizer
    target = (
        "<think>Rain?</think>\nChecking <|begin_of_box|>now<|end_of_box|>.\n<tool_call>get_weather\n"
        "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n"
        "</tool_call><|observation|>"
    )
    forced = tokenizer.encode(target, add_special_tokens=False)

    class Force(LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            step = min(input_ids.shape[1] - self.start, len(forced) - 1)
            only = torch.full_like(scores, float("-inf"))
            only[:, forced[step]] = 0
            return only

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir)).eval()
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Weather?"}],
        tools=[WEATHER],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    start = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=60, logits_processor=LogitsProcessorList([Force(start)]))
    generated = out[0][start:].tolist()
    assert generated == forced  # ends on <|observation|>: a stop token
    parser = OutputParser(thinking=True, tools=[WEATHER])
    deltas = [parser.feed(tokenizer.decode([token], skip_special_tokens=False)) for token in generated]
    deltas.append(parser.finish())
    assert parser.reasoning == "Rain?" and parser.text == "Checking now."
    assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2})
    ]
    assert "".join(d.text for d in deltas) == parser.text


# -- the output parser --------------------------------------------------------------------------------------------
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "q": {"type": "string"},
                "limit": {"type": "integer"},
                "filters": {"type": "object"},
                "tag": {"type": ["string", "null"]},
            },
        },
    },
}
TOOLS = [WEATHER, SEARCH]

# (output, thinking, tools) -> (answer, reasoning, [(name, arguments)])
SAMPLES = [
    (
        "<think>\nThe user asks.\n</think>\nIt is <|begin_of_box|>42<|end_of_box|>.",
        True,
        None,
        "It is 42.",
        "The user asks.",
        [],
    ),
    ("<think>still thinking", True, None, "", "still thinking", []),
    ("no markers at all", True, None, "no markers at all", "", []),  # no <think>: all answer (vLLM's glm45)
    ("Plain answer, <b>html</b> & <thin air>.", False, None, "Plain answer, <b>html</b> & <thin air>.", "", []),
    ("<think></think>\nAnswer", False, None, "Answer", "", []),
    ("<think>r</think>a", False, None, "a", "r", []),
    ("  <|begin_of_box|>[[1,2,3,4]]<|end_of_box|>  ", False, None, "[[1,2,3,4]]", "", []),
    ("a</think>b", False, None, "ab", "", []),  # a stray end marker is dropped
    ("<think>x<think>y</think>z</think>w", True, None, "zw", "xy", []),
    ("Answer.<|user|>", False, None, "Answer.", "", []),
    (  # tools given, a call after the reasoning and some text
        "<think>Need weather.</think>\nI'll check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>123</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        True,
        TOOLS,
        "I'll check.",
        "Need weather.",
        [("get_weather", {"city": "123", "days": 3})],
    ),
    (  # two calls: the whitespace between them is not text; text after the last call is
        "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value> cats </arg_value>\n<arg_key>limit</arg_key>\n"
        '<arg_value>5</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{"a": [1, "x"]}</arg_value>\n'
        "<arg_key>tag</arg_key>\n<arg_value>null</arg_value>\n</tool_call>\n\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\nDone.",
        False,
        TOOLS,
        "Done.",
        "",
        [
            ("search", {"q": "cats", "limit": 5, "filters": {"a": [1, "x"]}, "tag": None}),
            ("get_weather", {"city": "Paris"}),
        ],
    ),
    (  # text between calls keeps what separates it from the text before
        "A\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>X</arg_value>\n</tool_call>\nB",
        False,
        TOOLS,
        "A\nB",
        "",
        [("get_weather", {"city": "X"})],
    ),
    (  # unknown tool and a parameter without schema: values read as JSON, else kept as text
        "<tool_call>other\n<arg_key>n</arg_key>\n<arg_value>1.5</arg_value>\n<arg_key>s</arg_key>\n"
        "<arg_value>hello world</arg_value>\n<arg_key>b</arg_key>\n<arg_value>true</arg_value>\n</tool_call>",
        False,
        TOOLS,
        "",
        "",
        [("other", {"n": 1.5, "s": "hello world", "b": True})],
    ),
    (  # a string-typed parameter stays a string, JSON-looking or not; a union with string keeps text
        "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>[1, 2]</arg_value>\n<arg_key>tag</arg_key>\n"
        '<arg_value>{"a": 1}</arg_value>\n</tool_call>',
        False,
        TOOLS,
        "",
        "",
        [("search", {"q": "[1, 2]", "tag": '{"a": 1}'})],
    ),
    (  # the newer format without a newline after the name; no arguments at all
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
        "<tool_call>search</tool_call>",
        False,
        TOOLS,
        "",
        "",
        [("get_weather", {"city": "Oslo"}), ("search", {})],
    ),
    (  # never closed: it stays text, as written
        "Sure.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
        False,
        TOOLS,
        "Sure.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
        "",
        [],
    ),
    (  # no name: not a call
        "x <tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> y",
        False,
        TOOLS,
        "x <tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call> y",
        "",
        [],
    ),
    (  # without tools, tool-call text is just text
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        False,
        None,
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        "",
        [],
    ),
    (  # inside the reasoning, a call is reasoning text
        "<think>maybe <tool_call>search\n</tool_call></think>no call",
        True,
        TOOLS,
        "no call",
        "maybe <tool_call>search\n</tool_call>",
        [],
    ),
]


def _result(deltas):
    return (
        "".join(d.text for d in deltas),
        "".join(d.reasoning for d in deltas),
        [(c.name, json.loads(c.arguments)) for d in deltas for c in d.tool_calls],
    )


def _run(pieces, thinking, tools):
    parser = OutputParser(thinking=thinking, tools=tools)
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    assert all(isinstance(d, Delta) for d in deltas)
    # the deltas add up to the totals
    assert _result(deltas) == (
        parser.text,
        parser.reasoning,
        [(c.name, json.loads(c.arguments)) for c in parser.tool_calls],
    )
    return _result(deltas)


@pytest.mark.parametrize("output, thinking, tools, text, reasoning, calls", SAMPLES)
def test_parser_reads_every_split_the_same(output, thinking, tools, text, reasoning, calls):
    expected = (text, reasoning, calls)
    assert _run([output], thinking, tools) == expected
    for at in range(len(output) + 1):  # every place a piece can end, markers included
        assert _run([output[:at], output[at:]], thinking, tools) == expected, f"split at {at}"
    assert _run(list(output), thinking, tools) == expected  # one character at a time
    rng = random.Random(len(output))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(output) + 1), min(6, len(output) + 1)))
        pieces = [output[a:b] for a, b in zip([0, *cuts], [*cuts, len(output)], strict=True)]
        assert _run(pieces, thinking, tools) == expected, pieces
    whole = parse_output(output, thinking=thinking, tools=tools)
    assert _result([whole]) == expected


def test_a_possible_marker_is_held_back_until_decided():
    parser = OutputParser(thinking=False, tools=TOOLS)
    assert parser.feed("It is <|begin_of").text == "It is"  # the space waits for what follows it
    assert parser.feed("_box|>42").text == " 42"
    assert parser.feed(" <tool_").text == ""
    delta = parser.feed("call>search\n<arg_key>q</arg_key><arg_value>x</arg_value></tool_call>")
    assert delta.text == "" and [c.name for c in delta.tool_calls] == ["search"]
    assert parser.feed("<").text == ""
    assert parser.feed("b>").text == "<b>"  # not a marker after all
    assert parser.finish() == Delta()
    assert parser.text == "It is 42<b>"

    parser = OutputParser(thinking=False)
    assert parser.feed("a <|end").text == "a"
    assert parser.finish().text == " <|end"  # the output ended inside what looked like a marker


def test_reasoning_streams_as_it_comes():
    parser = OutputParser(thinking=True)
    assert parser.feed("<think>").reasoning == ""
    assert parser.feed("\nLet me").reasoning == "Let me"
    assert parser.feed(" see.\n").reasoning == " see."
    delta = parser.feed("</think>\nYes")
    assert (delta.reasoning, delta.text) == ("", "Yes")
    assert parser.finish() == Delta()
    assert (parser.reasoning, parser.text) == ("Let me see.", "Yes")


def test_tool_call_ids_index_and_misuse():
    assert re.fullmatch(r"call_[0-9a-f]{24}", new_call_id())
    parser = OutputParser(thinking=False, tools=[WEATHER], index=2)
    delta = parser.feed("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>")
    (tool_call,) = delta.tool_calls
    assert delta.index == 2 and re.fullmatch(r"call_[0-9a-f]{24}", tool_call.id)
    assert tool_call.as_openai(0)["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert parser.finish().index == 2
    with pytest.raises(RuntimeError):
        parser.feed("more")
    with pytest.raises(RuntimeError):
        parser.finish()
    ids = {
        c.id
        for c in parse_output(
            "<tool_call>a</tool_call><tool_call>a</tool_call>", thinking=False, tools=[WEATHER]
        ).tool_calls
    }
    assert len(ids) == 2
