"""The inference engine (a package): loading a vision-language model with transformers' auto
classes, decoding with every sampling parameter, structured outputs, and parsing GLM's output
formats (reasoning, tool calls, answer boxes).

Importing this package imports neither torch nor transformers (the web tier imports its names);
they are imported when a model is loaded.
"""

from inference.engine.core import (
    FORCE_TEST_OUTPUT_ENV,
    OOM_TEST_MARKER_ENV,
    SLOW_TEST_MARKER_ENV,
    Engine,
    EngineError,
    ModelLoadError,
)
from inference.engine.request import Choice, Delta, EngineRequest, Result, SamplingParams, ToolCall

__all__ = [
    "FORCE_TEST_OUTPUT_ENV",
    "OOM_TEST_MARKER_ENV",
    "SLOW_TEST_MARKER_ENV",
    "Choice",
    "Delta",
    "Engine",
    "EngineError",
    "EngineRequest",
    "ModelLoadError",
    "Result",
    "SamplingParams",
    "ToolCall",
]
