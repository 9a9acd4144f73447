"""``build_tiny_model``: a tiny, randomly initialised model of GLM-4.6V-Flash's architecture, built offline.

No machine here reaches a model hub, so tests and the embedded default serve this instead of
``zai-org/GLM-4.6V-Flash``. It has the same classes end to end — ``Glm4vConfig`` /
``Glm4vForConditionalGeneration``, ``Glm4vProcessor`` with ``Glm4vImageProcessor`` and
``Glm4vVideoProcessor``, a fast tokenizer carrying GLM's special tokens, and a chat template
equivalent to GLM's — and loads through the same auto classes, so the loading and generation code
is exercised for real. **Its weights are random: its answers are noise.** It is under 1 MB.
"""

import shutil
from pathlib import Path

# GLM's special tokens, in the order the real tokenizer numbers them (ids differ here).
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
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
]
# GLM stops on any of these.
EOS_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# Equivalent to GLM-4.6V's template for what Sightline sends: "[gMASK]<sop>", then each turn as
# "<|role|>\n" + its content, images as "<|begin_of_image|><|image|><|end_of_image|>", then the
# assistant's turn with an empty thinking block (non-thinking mode).
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n"
    "{%- elif msg.role == 'user' %}<|user|>\n"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n"
    "{%- elif msg.role == 'observation' %}<|observation|>\n{%- endif %}"
    "{%- if msg.content is string %}{{ msg.content }}"
    "{%- else %}{%- for item in msg.content %}"
    "{%- if item.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'text' %}{{ item.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n<think></think>\n{%- endif %}"
)

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
reached. Set `INFERENCE_MODEL=zai-org/GLM-4.6V-Flash` (or a local copy) for real answers.
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
    # Random weights pick any token. Keep the noise readable (no special tokens, no stray bytes or
    # control characters) and the length predictable: the stop tokens are suppressed too, so the
    # tiny model always generates exactly max_new_tokens (finish_reason "length").
    unreadable = [i for i in range(len(tokenizer)) if not _readable(tokenizer.decode([i]))]
    model.generation_config = GenerationConfig(
        eos_token_id=eos,
        pad_token_id=eos[0],
        do_sample=False,
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
