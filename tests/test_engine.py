"""The engine on the tiny random GLM-4V model. Its answers are noise, so these tests check shapes,
token counts and consistency, never content. The tiny model suppresses its stop tokens, so it
always generates exactly max_new_tokens."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from inference.engine import Engine, GenerationParams, ModelLoadError
from tests.conftest import REPO


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir))  # the same call as Engine.load("zai-org/GLM-4.6V-Flash")


@pytest.fixture
def picture():
    return Image.new("RGB", (320, 200), (30, 120, 200))


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
    assert engine.device == "cpu" and engine.dtype == "float32"


def test_stream_deltas_join_to_the_final_text(engine, picture):
    generation = engine.stream(picture, "What is in this picture?", GenerationParams(max_new_tokens=24))
    deltas = list(generation)
    result = generation.result
    assert deltas and all(deltas)
    assert "".join(deltas) == result.text
    assert result.prompt_tokens > 20  # the image tokens are part of the prompt
    assert result.completion_tokens == 24
    assert result.finish_reason == "length"


def test_max_new_tokens_bounds_the_answer(engine, picture):
    result = engine.generate(picture, "Describe it.", GenerationParams(max_new_tokens=4))
    assert result.completion_tokens == 4 and result.text


def test_sampling_runs(engine, picture):
    result = engine.generate(picture, "Describe it.", GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.8))
    assert result.completion_tokens == 8


def test_should_stop_cancels_within_a_token(engine, picture):
    generation = engine.stream(picture, "Describe it.", GenerationParams(max_new_tokens=500), should_stop=lambda: seen)
    seen = False
    deltas = []
    for delta in generation:
        deltas.append(delta)
        seen = True
    assert generation.result.finish_reason == "cancelled"
    assert generation.result.completion_tokens < 500
    assert "".join(deltas) == generation.result.text


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
