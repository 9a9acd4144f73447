"""``build_tiny_model``: a tiny, randomly initialised model of GLM-4.6V-Flash's architecture, built offline.

No machine here reaches a model hub, so tests and the embedded default serve this instead of
``zai-org/GLM-4.6V-Flash``. It has the same classes end to end — ``Glm4vConfig`` /
``Glm4vForConditionalGeneration``, ``Glm4vProcessor`` with ``Glm4vImageProcessor`` and
``Glm4vVideoProcessor`` — and speaks GLM-4.6V-Flash's formats: the published tokenizer's special
tokens (each one token), a chat template rendering the published one's text (thinking, tools, tool
results, images), and the published generation config. It loads through the same auto classes, so the
loading, generation and output-parsing code is exercised for real. **Its weights are random: its
answers are noise.** It is under 1 MB.
"""

import shutil
from pathlib import Path

# GLM-4.6V-Flash's added tokens, in the order its published tokenizer numbers them (151329 onwards there;
# the ids differ in this tiny vocabulary). Each is one token: tests check it.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
    "<|begin_of_transcription|>",
    "<|end_of_transcription|>",
    "<|code_prefix|>",
    "<|code_middle|>",
    "<|code_suffix|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "/nothink",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<|image|>",
    "<|video|>",
]
# GLM stops on any of these (its generation_config's eos_token_id: <|endoftext|>, <|user|>, <|observation|>).
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# GLM-4.6V-Flash's generation defaults (its generation_config.json, zai-org/GLM-4.6V-Flash, MIT licence): it
# samples by default. No hub is reachable from here, so they were read from public records of the model's
# defaults (temperature, top_p, top_k) and from GLM-V's own demo code (repetition_penalty 1.1, with top_k 2).
# An engine that takes omitted sampling parameters from the model's generation_config (as vLLM does) gets
# these; the tiny model carries the same so that path runs in tests.
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.6, "top_k": 2, "repetition_penalty": 1.1}

# The chat template: GLM-4.6V-Flash's prompt format (its published chat_template.jinja, zai-org/GLM-4.6V-Flash,
# MIT licence), re-implemented here rather than copied. It renders the same text as the published template for
# every conversation Sightline sends, which tests/test_glm_format.py checks case by case (it was checked against
# the published template's own rendering while being written):
# - "[gMASK]<sop>", then with `tools` a system turn listing each tool as JSON with GLM's tool-call instructions;
# - system "<|system|>\n…", user "<|user|>\n…" (images and videos as begin/placeholder/end markers, in place);
# - assistant "<|assistant|>\n<think>…</think>" (the reasoning shown only for turns after the last user turn,
#   from `reasoning_content` or a "<think>…</think>" prefix of the content), then "\n" + the stripped content,
#   then each tool call as "\n<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>\n…</tool_call>"
#   (V: a string as is, anything else as JSON); `arguments` must be an object here — see
#   inference.engine.output.template_messages, which parses JSON-string arguments first, as vLLM does;
# - tool results "<|observation|>" once per run of tool messages, each "\n<tool_response>\n…\n</tool_response>"
#   (a text result keeps the published template's newline after the closing tag);
# - thinking is on by default; `enable_thinking=False` (a template kwarg) appends "/nothink" to user turns and
#   opens the assistant turn with an empty "<think></think>\n", as the published template does.
# One deliberate difference: a `null` content renders as nothing (the published template prints "None").
CHAT_TEMPLATE = r"""{#- GLM-4.6V-Flash's prompt format (zai-org/GLM-4.6V-Flash, chat_template.jinja, MIT licence),
    re-implemented for Sightline's tiny test model: equivalent to the published template for the
    conversations Sightline sends, checked against its rendering; not a copy of it. -#}
{%- macro visible(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is string -%}
                {{- part -}}
            {%- elif part is mapping and part.type == 'text' -%}
                {{- part.text -}}
            {%- elif part is mapping and (part.type == 'image' or 'image' in part) -%}
                {{- '<|begin_of_image|><|image|><|end_of_image|>' -}}
            {%- elif part is mapping and (part.type == 'video' or 'video' in part) -%}
                {{- '<|begin_of_video|><|video|><|end_of_video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- elif content is not none -%}
        {{- content -}}
    {%- endif -%}
{%- endmacro -%}
{%- set no_think = enable_thinking is defined and not enable_thinking -%}
{%- set state = namespace(last_user=-1) -%}
{%- for m in messages -%}
    {%- if m.role == 'user' -%}{%- set state.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- '[gMASK]<sop>' -}}
{%- if tools -%}
    {{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- tool | tojson(ensure_ascii=False) -}}{{- '\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML '
        'format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}'
        '</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>' -}}
{%- endif -%}
{%- for m in messages -%}
    {%- if m.role == 'system' -%}
        {{- '<|system|>\n' ~ visible(m.content) -}}
    {%- elif m.role == 'user' -%}
        {%- set text = visible(m.content) -%}
        {{- '<|user|>\n' ~ text -}}
        {%- if no_think and not text.endswith('/nothink') -%}{{- '/nothink' -}}{%- endif -%}
    {%- elif m.role == 'assistant' -%}
        {%- set text = visible(m.content) -%}
        {%- set thought = '' -%}
        {%- if m.reasoning_content is string -%}
            {%- set thought = m.reasoning_content -%}
        {%- elif '</think>' in text -%}
            {%- set thought = text.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
            {%- set text = text.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {{- '<|assistant|>\n<think>' -}}
        {%- if loop.index0 > state.last_user -%}{{- thought.strip() -}}{%- endif -%}
        {{- '</think>' -}}
        {%- if text.strip() -%}{{- '\n' ~ text.strip() -}}{%- endif -%}
        {%- for call in m.tool_calls or [] -%}
            {%- set fn = call.function if call.function else call -%}
            {%- if fn.arguments is string -%}
                {{- raise_exception('tool_calls arguments must be an object here: parse the JSON text first') -}}
            {%- endif -%}
            {{- '\n<tool_call>' ~ fn.name ~ '\n' -}}
            {%- for key, value in fn.arguments.items() -%}
                {{- '<arg_key>' ~ key ~ '</arg_key>\n<arg_value>' -}}
                {{- value if value is string else value | tojson(ensure_ascii=False) -}}
                {{- '</arg_value>\n' -}}
            {%- endfor -%}
            {{- '</tool_call>' -}}
        {%- endfor -%}
    {%- elif m.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}
        {{- '\n<tool_response>\n' -}}
        {%- if m.content is string -%}
            {{- m.content ~ '\n</tool_response>\n' -}}
        {%- else -%}
            {%- for part in m.content -%}
                {%- if part is mapping and part.type is defined -%}
                    {%- set kind = part.type | lower -%}
                    {%- if kind == 'text' and part.text is defined -%}
                        {{- part.text -}}
                    {%- elif kind in ['image', 'image_url'] -%}
                        {{- '<|begin_of_image|><|image|><|end_of_image|>' -}}
                    {%- elif kind in ['video', 'video_url'] -%}
                        {{- '<|begin_of_video|><|video|><|end_of_video|>' -}}
                    {%- else -%}
                        {{- part | tojson(ensure_ascii=False) -}}
                    {%- endif -%}
                {%- else -%}
                    {{- part.output if part.output is defined else part -}}
                {%- endif -%}
            {%- endfor -%}
            {{- '\n</tool_response>' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>\n' -}}
    {%- if no_think -%}{{- '<think></think>\n' -}}{%- endif -%}
{%- endif -%}
"""

_CORPUS = [
    "A small house stands under a yellow sun on green grass.",
    "The picture shows a cat sitting on a red chair next to a window.",
    "What is in this picture? Describe the image in detail, please.",
    "Two people are walking along the beach at sunset with a dog.",
    "The chart has three blue bars and one orange line going up.",
    "A street with cars, a bus, traffic lights and tall buildings.",
]

README_TITLE = "# tiny-glm4v"  # the first line of the README it writes, by which it is recognised
_README = f"""{README_TITLE} — a test model, not a real one

Built offline by `python manage.py build_tiny_model`. Same architecture classes as
GLM-4.6V-Flash (`Glm4vForConditionalGeneration`, `Glm4vProcessor`), 2 text layers 64 wide and a
2-deep, 32-wide vision tower, **randomly initialised: its answers are random noise.** It exists so
that Sightline's loading, streaming and serving code runs for real where no model hub can be
reached. It speaks GLM-4.6V-Flash's formats: the same special tokens, a chat template equivalent to
the published one (credited in `chat_template.jinja`) and the same generation defaults. Set
`INFERENCE_MODEL=zai-org/GLM-4.6V-Flash` (or a local copy) for real answers.
"""


def _readable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in "\n " for c in text)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


def build_tiny_model(out_dir, seed: int = 0) -> Path:
    """Write the tiny model, its processor and generation config to ``out_dir``; return the folder."""
    import torch
    from transformers import (
        GenerationConfig,
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    out = Path(out_dir)
    tokenizer = _tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Glm4vConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head size 16, half of it rotary: the multimodal rope sections sum to a quarter of it.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "partial_rotary_factor": 0.5,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "image_size": 224,
        },
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config).eval()

    eos = [ids[token] for token in EOS_TOKENS]
    # GLM-4.6V-Flash's published defaults, plus one thing for tests only: random weights pick any token, so
    # keep the noise readable (no special tokens, no stray bytes or control characters) and the length
    # predictable. The stop tokens are suppressed too, so the tiny model always generates exactly
    # max_new_tokens (finish_reason "length"); to make it say something specific (markers included), a test
    # forces tokens through a logits processor that leaves only the chosen token possible.
    unreadable = [i for i in range(len(tokenizer)) if not _readable(tokenizer.decode([i]))]
    model.generation_config = GenerationConfig(
        **GENERATION_DEFAULTS,
        eos_token_id=eos,
        pad_token_id=eos[0],
        suppress_tokens=sorted(set(ids.values()) | set(unreadable)),
    )
    # Small images: at most 224x224 pixels reach the vision tower (64 image tokens).
    size = {"shortest_edge": 28 * 28, "longest_edge": 224 * 224}
    vision = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **vision),
        video_processor=Glm4vVideoProcessor(size=size, **vision),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(_README)
    return out


def is_tiny_model(folder) -> bool:
    """Whether ``folder`` holds a model this module built (read from its README: no torch needed)."""
    try:
        return (Path(folder) / "README.md").read_text(encoding="utf-8", errors="replace").startswith(README_TITLE)
    except OSError:
        return False


def is_built(folder) -> bool:
    return (Path(folder) / "config.json").is_file() and any(Path(folder).glob("*.safetensors"))
