"""The engine on the tiny random GLM-4V model. Its answers are noise, so these tests check shapes,
token counts and consistency, never content. The tiny model suppresses its stop tokens, so it
always generates exactly max_new_tokens."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from inference.engine import Engine, EngineRequest, ModelLoadError, SamplingParams
from tests.conftest import REPO


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir))  # the same call as Engine.load("zai-org/GLM-4.6V-Flash")


@pytest.fixture
def picture():
    return Image.new("RGB", (320, 200), (30, 120, 200))


def ask(picture, prompt: str, **sampling) -> EngineRequest:
    """One user turn: the picture, then the question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return EngineRequest(messages=messages, images=[picture], sampling=SamplingParams(**sampling))


def test_tiny_model_is_the_glm4v_architecture_and_small(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Glm4vForConditionalGeneration"]
    assert config["model_type"] == "glm4v"
    size = sum(f.stat().st_size for f in tiny_model_dir.iterdir())
    assert size < 5 * 1024 * 1024
    assert "noise" in (tiny_model_dir / "README.md").read_text()


def test_loads_through_the_auto_classes(engine):
    assert type(engine.model).__name__ == "Glm4vForConditionalGeneration"
    assert type(engine.processor).__name__ == "Glm4vProcessor"
    # The README's promise: CUDA in bfloat16 when a GPU is there, else the CPU in float32.
    import torch

    cuda = torch.cuda.is_available()
    assert engine.device == ("cuda" if cuda else "cpu")
    assert engine.dtype == ("bfloat16" if cuda else "float32")
    weights = next(engine.model.parameters())
    assert weights.device.type == engine.device and str(weights.dtype) == f"torch.{engine.dtype}"


def test_stream_deltas_join_to_the_final_text(engine, picture):
    generation = engine.stream(ask(picture, "What is in this picture?", max_new_tokens=24))
    deltas = list(generation)
    result = generation.result
    assert deltas and all(d.text for d in deltas)
    assert "".join(d.text for d in deltas) == result.choices[0].text
    assert result.prompt_tokens > 20  # the image tokens are part of the prompt
    assert result.completion_tokens == 24
    assert result.choices[0].finish_reason == "length"


def test_max_new_tokens_bounds_the_answer(engine, picture):
    result = engine.generate(ask(picture, "Describe it.", max_new_tokens=4))
    assert result.completion_tokens == 4 and result.choices[0].text


def test_sampling_runs(engine, picture):
    result = engine.generate(ask(picture, "Describe it.", max_new_tokens=8, temperature=0.9, top_p=0.8))
    assert result.completion_tokens == 8


def test_should_stop_cancels_within_a_token(engine, picture):
    """``should_stop`` is asked once per generated token; the token after which it first says yes
    is the last one generated."""
    asked = 0
    stopped_after = None

    def should_stop():
        nonlocal asked, stopped_after
        asked += 1
        if deltas and stopped_after is None:
            stopped_after = asked  # the first time it is asked once text has arrived
        return stopped_after is not None

    deltas = []
    generation = engine.stream(ask(picture, "Describe it.", max_new_tokens=500), should_stop=should_stop)
    for delta in generation:
        deltas.append(delta.text)
    assert generation.result.choices[0].finish_reason == "cancelled"
    assert stopped_after is not None and generation.result.completion_tokens == stopped_after
    assert asked == stopped_after  # never asked again once it said stop
    assert "".join(deltas) == generation.result.choices[0].text


def test_missing_model_path_fails_with_its_name():
    with pytest.raises(ModelLoadError) as info:
        Engine.load("/nonexistent/model")
    assert info.value.code == "model_unavailable"
    assert "/nonexistent/model" in info.value.message


def test_broken_model_folder_fails_with_its_name(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as info:
        Engine.load(str(tmp_path))
    assert str(tmp_path) in info.value.message and "config.json" in info.value.message


def test_importing_the_engine_does_not_import_torch():
    code = "import sys, inference.engine; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False False", result.stderr


def test_every_image_of_a_conversation_reaches_the_model(engine):
    """Two different images: swapping them changes the greedy answer, and so does dropping one (the
    prompt then holds fewer image tokens). A model that saw only the first image would answer the
    swapped pair as it answers the first one alone, in the first slot."""
    red, blue = Image.new("RGB", (120, 90), (220, 30, 30)), Image.new("RGB", (60, 150), (20, 40, 230))
    both = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]

    def answer(images, content):
        request = EngineRequest(
            messages=[{"role": "user", "content": content}],
            images=images,
            sampling=SamplingParams(max_new_tokens=24, temperature=0),
        )
        return engine.generate(request)

    forward, backward = answer([red, blue], both), answer([blue, red], both)
    assert forward.choices[0].text != backward.choices[0].text
    one = answer([red], [{"type": "image"}, {"type": "text", "text": "Compare them."}])
    assert one.prompt_tokens < forward.prompt_tokens == backward.prompt_tokens
