"""The inference engine (a package): loading a vision-language model with transformers' auto
classes, decoding with every sampling parameter, structured outputs, and parsing GLM's output
formats (reasoning, tool calls, answer boxes).

Importing this package imports neither torch nor transformers (the web tier imports its names);
they are imported when a model is loaded.
"""

from inference.engine.core import (
    OOM_TEST_MARKER_ENV,
    Completion,
    Engine,
    EngineError,
    Generation,
    GenerationParams,
    ModelLoadError,
)

__all__ = [
    "OOM_TEST_MARKER_ENV",
    "Completion",
    "Engine",
    "EngineError",
    "Generation",
    "GenerationParams",
    "ModelLoadError",
]
