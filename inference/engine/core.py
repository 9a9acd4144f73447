"""The engine core: loads a vision-language model with transformers' auto classes and streams
its answers. Used by the Celery workers and by the embedded default's worker thread.

Importing this module imports neither torch nor transformers (the web tier imports its names);
they are imported when a model is loaded.
"""

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("sightline.engine")


class EngineError(Exception):
    """A failure with a stable error code (``gpu_oom``, ``model_unavailable``, ``internal_error``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ModelLoadError(EngineError):
    def __init__(self, message: str):
        super().__init__("model_unavailable", message)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence), "length" (max_new_tokens) or "cancelled"


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


# Test-only: there is no GPU in CI, so nothing can really run out of its memory. When this variable
# holds a marker, the model's forward pass raises torch.cuda.OutOfMemoryError for every query whose
# prompt contains it, and the error takes the real path (generate -> translate_error -> gpu_oom).
# Only tests set it; unset (production), nothing changes.
OOM_TEST_MARKER_ENV = "SIGHTLINE_TEST_OOM_MARKER"


def _oom_injected(prompt: str) -> bool:
    marker = os.environ.get(OOM_TEST_MARKER_ENV, "")
    return bool(marker) and marker in (prompt or "")


def _raise_oom(module, args):
    import torch

    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_TEST_MARKER_ENV}).")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Generation:
    """An answer being generated. Iterate for the text deltas; afterwards ``result`` is the Completion.

    The deltas joined equal ``result.text``. An error in generation is raised from the iteration
    as ``EngineError``.
    """

    _POLL_SECONDS = 0.1

    def __init__(
        self,
        engine: "Engine",
        inputs,
        params: GenerationParams,
        should_stop: Callable[[], bool] | None,
        *,
        inject_oom: bool = False,
    ):
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        self.result: Completion | None = None
        self._engine = engine
        self._prompt_tokens = int(inputs["input_ids"].shape[1])
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._sequences = None
        self._inject_oom = inject_oom
        self._streamer = TextIteratorStreamer(
            engine.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=self._POLL_SECONDS
        )
        cancelled = self._cancelled

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if should_stop is not None and should_stop():
                    cancelled.set()
                    return True
                return False

        kwargs = dict(inputs)
        kwargs.update(
            max_new_tokens=params.max_new_tokens,
            streamer=self._streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenAsked()]),
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self._thread = threading.Thread(target=self._generate, args=(kwargs,), name="sightline-generate", daemon=True)
        self._thread.start()

    def _generate(self, kwargs) -> None:
        import torch

        hook = self._engine.model.register_forward_pre_hook(_raise_oom) if self._inject_oom else None
        try:
            with torch.inference_mode():
                self._sequences = self._engine.model.generate(**kwargs)
        except BaseException as exc:  # reported from the iterating thread
            self._error = exc
            self._streamer.end()
        finally:
            if hook is not None:
                hook.remove()

    def __iter__(self) -> Iterator[str]:
        from queue import Empty

        pieces: list[str] = []
        while True:
            try:
                piece = next(iter(self._streamer))
            except StopIteration:
                break
            except Empty:
                if not self._thread.is_alive() and self._streamer.text_queue.empty():
                    break  # generation ended without closing the stream
                continue
            if piece:
                pieces.append(piece)
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._engine.translate_error(self._error)
        self.result = self._complete("".join(pieces))

    def _complete(self, text: str) -> Completion:
        generated = self._sequences[0, self._prompt_tokens :]
        completion_tokens = int(generated.shape[0])
        if self._cancelled.is_set():
            reason = "cancelled"
        elif completion_tokens and int(generated[-1]) in self._engine.eos_token_ids:
            reason = "stop"
        else:
            reason = "length"
        return Completion(text, self._prompt_tokens, completion_tokens, reason)


class Engine:
    """One loaded model. Used by one worker at a time."""

    def __init__(self, model_id: str, device: str = "", dtype: str = ""):
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.processor = None
        self.model = None
        self.eos_token_ids: set[int] = set()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @classmethod
    def load(cls, model_id: str, device: str = "", dtype: str = "") -> "Engine":
        engine = cls(model_id, device, dtype)
        engine._load()
        return engine

    def _check_local(self) -> None:
        folder = Path(self.model_id).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"Could not load the model from '{self.model_id}': no such folder.")
        config = folder / "config.json"
        try:
            json.loads(config.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"Could not load the model from '{self.model_id}': config.json is missing.") from None
        except (ValueError, OSError) as exc:
            raise ModelLoadError(
                f"Could not load the model from '{self.model_id}': config.json is invalid ({exc})."
            ) from exc

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if _looks_like_path(self.model_id):
            self._check_local()
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=getattr(torch, self.dtype))
            self.model = model.to(self.device).eval()
        except EngineError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"Could not load the model from '{self.model_id}': {type(exc).__name__}: {str(exc)[:500]}"
            ) from exc
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        logger.info("loaded %s on %s (%s)", self.model_id, self.device, self.dtype)

    def _inputs(self, image, prompt: str, messages: list | None = None):
        if messages:  # a conversation (chat completions): its image part gets the picture
            messages = [
                {
                    **message,
                    "content": [
                        {"type": "image", "image": image} if part.get("type") == "image" else part
                        for part in message["content"]
                    ]
                    if isinstance(message["content"], list)
                    else message["content"],
                }
                for message in messages
            ]
        else:
            messages = [
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}
            ]
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        return inputs.to(self.device)

    def stream(
        self,
        image,
        prompt: str,
        params: GenerationParams,
        should_stop: Callable[[], bool] | None = None,
        messages: list | None = None,
    ) -> Generation:
        """Start generating. ``messages`` (optional) is a whole conversation in the chat-template
        format whose one ``{"type": "image"}`` part stands for ``image``; else the prompt is asked
        about the image in one user turn."""
        if not self.loaded:
            raise EngineError("model_unavailable", f"The model '{self.model_id}' is not loaded.")
        try:
            inputs = self._inputs(image, prompt, messages)
            return Generation(self, inputs, params, should_stop, inject_oom=_oom_injected(prompt))
        except EngineError:
            raise
        except Exception as exc:
            raise self.translate_error(exc) from exc

    def generate(self, image, prompt: str, params: GenerationParams, should_stop=None) -> Completion:
        generation = self.stream(image, prompt, params, should_stop)
        for _ in generation:
            pass
        return generation.result

    def translate_error(self, exc: BaseException) -> EngineError:
        """A CUDA out-of-memory becomes ``gpu_oom`` (and the cache is freed); anything else ``internal_error``."""
        if isinstance(exc, EngineError):
            return exc
        if _is_oom(exc):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return EngineError("gpu_oom", "The GPU ran out of memory on this query; try a smaller max_tokens or image.")
        logger.error("generation failed: %r", exc)
        return EngineError("internal_error", f"Generation failed: {type(exc).__name__}")
