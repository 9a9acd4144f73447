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
from pathlib import Path

from inference.engine.output import OutputParser, template_messages
from inference.engine.request import Delta, EngineRequest, Result

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


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).exists()


# Test-only: there is no GPU in CI, so nothing can really run out of its memory. When this variable
# holds a marker, the model's forward pass raises torch.cuda.OutOfMemoryError for every query whose
# prompt contains it, and the error takes the real path (generate -> translate_error -> gpu_oom).
# Only tests set it; unset (production), nothing changes.
OOM_TEST_MARKER_ENV = "SIGHTLINE_TEST_OOM_MARKER"

# Test-only: a random model cannot be made to say something specific, so tests force a chosen
# output through the real generation path. When this variable holds a JSON object
# {"marker": "text", ...}, a request whose conversation contains a marker has its output forced to
# the tokens of that text (special tokens such as <think> or <tool_call> included), then EOS. The
# forced token goes through everything else (stop strings, parsing, logprobs, constraints apply
# to what is kept). Only tests set it; unset (production), nothing changes.
FORCE_TEST_OUTPUT_ENV = "SIGHTLINE_TEST_FORCE_OUTPUT"


def _oom_injected(prompt: str) -> bool:
    marker = os.environ.get(OOM_TEST_MARKER_ENV, "")
    return bool(marker) and marker in (prompt or "")


def _raise_oom(module, args):
    import torch

    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {OOM_TEST_MARKER_ENV}).")


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def conversation_text(messages: list) -> str:
    """Every text of a conversation, joined (the test hooks look for their markers in it)."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return "\n".join(texts)


_DONE = object()


class Generation:
    """An answer being generated. Iterate for the ``Delta`` pieces of every choice; afterwards
    ``result`` is the ``Result``. The pieces of a choice joined equal its text, reasoning and tool
    calls. An error in generation is raised from the iteration as ``EngineError``."""

    def __init__(self, engine: "Engine", inputs, rows, sampler, steps, max_new_tokens: int, *, inject_oom=False):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        self.result: Result | None = None
        self._engine = engine
        self._rows = rows
        self._steps = steps
        self._out = rows[0].out
        self._prompt_tokens = int(inputs["input_ids"].shape[1])
        self._error: BaseException | None = None
        self._inject_oom = inject_oom
        kwargs = dict(inputs)
        kwargs.update(
            max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([steps]),
            # The Sampler has chosen each token already; generate's greedy step only reads it off.
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            min_p=None,
            repetition_penalty=None,
            num_beams=1,
        )
        self._thread = threading.Thread(target=self._generate, args=(kwargs,), name="sightline-generate", daemon=True)
        self._thread.start()

    def _generate(self, kwargs) -> None:
        import torch

        hook = self._engine.model.register_forward_pre_hook(_raise_oom) if self._inject_oom else None
        try:
            with torch.inference_mode():
                self._engine.model.generate(**kwargs)
            for row in self._rows:
                row.finish("cancelled" if self._steps.cancelled else "length")
        except BaseException as exc:  # reported from the iterating thread
            self._error = exc
        finally:
            if hook is not None:
                hook.remove()
            self._out.put(_DONE)

    def __iter__(self) -> Iterator[Delta]:
        while True:
            item = self._out.get()
            if item is _DONE:
                break
            yield item
        self._thread.join()
        if self._error is not None:
            raise self._engine.translate_error(self._error)
        self.result = Result(choices=[row.choice() for row in self._rows], prompt_tokens=self._prompt_tokens)


class Engine:
    """One loaded model. Used by one worker at a time."""

    def __init__(self, model_id: str, device: str = "", dtype: str = ""):
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.processor = None
        self.model = None
        self.eos_token_ids: set[int] = set()
        self.vocab_size = 0
        # The model's generation_config values for what a request leaves out (as vLLM does).
        self.sampling_defaults: dict = {}
        self._ll_tokenizer = None  # llguidance's view of the tokenizer, made on first use

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
        config = self.model.generation_config
        eos = config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)
        # vLLM takes these from generation_config whatever its do_sample says; so do we.
        # Only what the model's generation_config.json sets: transformers' own defaults (top_k 50)
        # are not the model's advice.
        given = config.to_diff_dict()
        self.sampling_defaults = {
            name: given[name]
            for name in ("temperature", "top_p", "top_k", "repetition_penalty")
            if given.get(name) is not None
        }
        logger.info("loaded %s on %s (%s)", self.model_id, self.device, self.dtype)

    def _inputs(self, request: EngineRequest):
        """The model's inputs for a conversation: the k-th ``{"type": "image"}`` part gets ``images[k]``.

        ``sanitize_control_tokens``: a user's text that spells a special token (``<|assistant|>``,
        ``<tool_call>``) is encoded as plain text, so no one can forge a turn or a tool call."""
        images = iter(request.images)
        messages = []
        for message in template_messages(request.messages):
            content = message.get("content")
            if isinstance(content, list):
                content = [{"type": "image", "image": next(images)} if p.get("type") == "image" else p for p in content]
            messages.append({**message, "content": content if content is not None else ""})
        template_kwargs = {"enable_thinking": request.enable_thinking}
        if request.tools and request.tool_choice != "none":
            template_kwargs["tools"] = request.tools
        inputs = self.processor.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            sanitize_control_tokens=True,
            **template_kwargs,
        )
        return inputs

    @staticmethod
    def _expanded(inputs, n: int):
        """The inputs of one conversation repeated for n choices decoded together: per-sequence
        tensors get n rows; the images' patches and grids (flattened over images) n copies."""
        if n == 1:
            return dict(inputs)
        import torch

        expanded = {}
        for key, value in inputs.items():
            if key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
                expanded[key] = torch.cat([value] * n, dim=0)
            else:
                expanded[key] = value.repeat(n, *([1] * (value.dim() - 1)))
        return expanded

    def _matcher(self, grammar: str | None):
        if grammar is None:
            return None
        import llguidance

        if self._ll_tokenizer is None:
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.processor.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos_token_ids)
            )
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise EngineError("invalid_request", f"The output constraint could not be compiled: {matcher.get_error()}")
        return matcher

    def stream(self, request: EngineRequest, should_stop: Callable[[], bool] | None = None) -> Generation:
        """Start generating ``request.sampling.n`` choices of one conversation, together."""
        if not self.loaded:
            raise EngineError("model_unavailable", f"The model '{self.model_id}' is not loaded.")
        try:
            return self._start(request, should_stop)
        except EngineError:
            raise
        except Exception as exc:
            raise self.translate_error(exc) from exc

    def _start(self, request: EngineRequest, should_stop) -> Generation:
        import queue

        from inference.engine import constraints, decoding

        sampling = request.sampling
        inputs = self._expanded(self._inputs(request).to(self.device), sampling.n)
        text = conversation_text(request.messages)
        forced = decoding.forced_output(text)
        forced_ids = self.processor.tokenizer.encode(forced, add_special_tokens=False) if forced is not None else None
        grammar = constraints.grammar_for(
            response_format=request.response_format, tools=request.tools, tool_choice=request.tool_choice
        )
        tokenizer = self.processor.tokenizer
        think_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
        think_ids = tuple(i if isinstance(i, int) and i != tokenizer.unk_token_id else None for i in think_ids)
        out: queue.Queue = queue.Queue()
        prompt_ids = inputs["input_ids"][0].tolist()
        tools = request.tools if request.tool_choice != "none" else None
        rows = [
            decoding.Row(
                index=index,
                sampling=sampling,
                defaults=self.sampling_defaults,
                tokenizer=tokenizer,
                vocab_size=self.vocab_size,
                eos_ids=self.eos_token_ids,
                prompt_ids=prompt_ids,
                matcher=self._matcher(grammar),
                forced=forced_ids,
                parser=OutputParser(thinking=request.enable_thinking, tools=tools),
                think_ids=think_ids,
                out=out,
            )
            for index in range(sampling.n)
        ]
        pad = self.model.generation_config.pad_token_id
        pad = pad if isinstance(pad, int) else min(self.eos_token_ids)
        sampler = decoding.Sampler(rows, pad)
        steps = decoding.Steps(rows, should_stop)
        return Generation(self, inputs, rows, sampler, steps, sampling.max_new_tokens, inject_oom=_oom_injected(text))

    def generate(self, request: EngineRequest, should_stop=None) -> Result:
        generation = self.stream(request, should_stop)
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
