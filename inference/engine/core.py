"""The engine core: loads a vision-language model with transformers' auto classes and streams
its answers. Used by the Celery workers and by the embedded default's worker thread.

Importing this module imports neither torch nor transformers (the web tier imports its names);
they are imported when a model is loaded.
"""

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inference.engine.output import OutputParser, template_messages
from inference.engine.request import EngineRequest, Result

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

# Test-only: the tiny model decodes a token in a millisecond or two, so a test that must catch a
# query while it runs (a Redis pause, a kill) cannot know it still runs when it acts. When this
# variable holds a marker, every decoding step of a batch holding a query whose conversation
# contains it sleeps SLOW_TEST_STEP_SECONDS. Only tests set it; unset (production), nothing changes.
SLOW_TEST_MARKER_ENV = "SIGHTLINE_TEST_SLOW_MARKER"
SLOW_TEST_STEP_SECONDS = 0.05


def _slowed(prompt: str) -> bool:
    marker = os.environ.get(SLOW_TEST_MARKER_ENV, "")
    return bool(marker) and marker in (prompt or "")


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


@dataclass
class Prepared:
    """A conversation encoded for the model (on the CPU), with what decoding it needs."""

    inputs: dict  # input_ids, attention_mask (1 x L), pixel_values and image_grid_thw when images
    prompt_tokens: int
    forced_ids: list[int] | None
    grammar: str | None
    inject_oom: bool
    slowed: bool = False


# Inputs flattened over images (concatenated in row order when batched), not one row per sequence.
_FLAT_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


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
        self.scheduler = None  # set by enable_batching (workers)
        self.pad_token_id = 0

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
        pad = config.pad_token_id
        self.pad_token_id = pad if isinstance(pad, int) else min(self.eos_token_ids)
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

    def enable_batching(self, *, max_batch: int, wait_ms: float, max_tokens: int, pending=None) -> None:
        """From now on ``stream`` goes through a scheduler that decodes queries together (a worker's).
        ``pending``: how many queries the worker holds now (see ``batching``): with it, a query that
        comes alone does not wait out the gathering window."""
        from inference.engine.batching import Scheduler

        self.scheduler = Scheduler(
            self, max_batch=max_batch, wait_seconds=wait_ms / 1000, max_tokens=max_tokens, pending=pending
        )

    def stream(self, request: EngineRequest, should_stop: Callable[[], bool] | None = None):
        """Start generating ``request.sampling.n`` choices of one conversation: with batching on, in
        the scheduler's next batch; else alone, in a thread of its own. Returns a ``Generation``."""
        from inference.engine.batching import Generation, run_batch

        if not self.loaded:
            raise EngineError("model_unavailable", f"The model '{self.model_id}' is not loaded.")
        generation = Generation(self, request, should_stop)
        if self.scheduler is not None:
            return self.scheduler.submit(generation)
        threading.Thread(target=run_batch, args=(self, [generation]), name="sightline-generate", daemon=True).start()
        return generation

    def generate(self, request: EngineRequest, should_stop=None) -> Result:
        generation = self.stream(request, should_stop)
        for _ in generation:
            pass
        return generation.result

    def generate_batch(self, requests: list[EngineRequest]) -> list[Result]:
        """Decode these requests together in this thread, bypassing the scheduler (benchmarks)."""
        from inference.engine.batching import Generation, run_batch

        generations = [Generation(self, request) for request in requests]
        run_batch(self, generations)
        results = []
        for generation in generations:
            for _ in generation:
                pass
            results.append(generation.result)
        return results

    def prepare(self, request: EngineRequest) -> Prepared:
        """Encode a conversation (template, images, tokens) and compile its grammar; CPU only."""
        from inference.engine import constraints, decoding

        inputs = dict(self._inputs(request))
        forced = decoding.forced_output(conversation_text(request.messages))
        tokenizer = self.processor.tokenizer
        return Prepared(
            inputs=inputs,
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            forced_ids=tokenizer.encode(forced, add_special_tokens=False) if forced is not None else None,
            grammar=constraints.grammar_for(
                response_format=request.response_format, tools=request.tools, tool_choice=request.tool_choice
            ),
            inject_oom=_oom_injected(conversation_text(request.messages)),
            slowed=_slowed(conversation_text(request.messages)),
        )

    def _collate(self, rows_inputs: list[dict]) -> dict:
        """One batch of rows, left-padded (GLM's rope positions follow the attention mask)."""
        import torch

        longest = max(int(inputs["input_ids"].shape[1]) for inputs in rows_inputs)
        batch: dict[str, list] = {}
        for inputs in rows_inputs:
            pad = longest - int(inputs["input_ids"].shape[1])
            for key, value in inputs.items():
                if key in _FLAT_INPUTS:
                    batch.setdefault(key, []).append(value)
                    continue
                fill = self.pad_token_id if key == "input_ids" else 0
                padding = torch.full((1, pad), fill, dtype=value.dtype)
                batch.setdefault(key, []).append(torch.cat([padding, value], dim=1))
        return {key: torch.cat(values, dim=0).to(self.device) for key, values in batch.items()}

    def decode(self, prepared: list[Prepared], generations: list) -> list[Result]:
        """Decode prepared conversations together (every choice a row); pieces go to each
        generation as they come. Runs in the calling thread."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from inference.engine import decoding

        tokenizer = self.processor.tokenizer
        think_ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))
        think_ids = tuple(i if isinstance(i, int) and i != tokenizer.unk_token_id else None for i in think_ids)
        rows, rows_inputs, groups = [], [], []
        for item, generation in zip(prepared, generations, strict=True):
            request = generation.request
            tools = request.tools if request.tool_choice != "none" else None
            prompt_ids = item.inputs["input_ids"][0].tolist()
            own = [
                decoding.Row(
                    index=index,
                    sampling=request.sampling,
                    defaults=self.sampling_defaults,
                    tokenizer=tokenizer,
                    vocab_size=self.vocab_size,
                    eos_ids=self.eos_token_ids,
                    prompt_ids=prompt_ids,
                    matcher=self._matcher(item.grammar),
                    forced=item.forced_ids,
                    parser=OutputParser(thinking=request.enable_thinking, tools=tools),
                    think_ids=think_ids,
                    out=generation,
                )
                for index in range(request.sampling.n)
            ]
            rows.extend(own)
            rows_inputs.extend([item.inputs] * request.sampling.n)
            groups.append((own, generation.should_stop))
        inputs = self._collate(rows_inputs)
        delay = SLOW_TEST_STEP_SECONDS if any(p.slowed for p in prepared) else 0
        steps = decoding.Steps(rows, groups, step_delay=delay)
        hook = self.model.register_forward_pre_hook(_raise_oom) if any(p.inject_oom for p in prepared) else None
        try:
            with torch.inference_mode():
                self.model.generate(
                    **inputs,
                    max_new_tokens=max(g.request.sampling.max_new_tokens for g in generations),
                    logits_processor=LogitsProcessorList([decoding.Sampler(rows, self.pad_token_id)]),
                    stopping_criteria=StoppingCriteriaList([steps]),
                    # The Sampler has chosen each token already; generate's greedy step only reads it off.
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    min_p=None,
                    repetition_penalty=None,
                    num_beams=1,
                    pad_token_id=self.pad_token_id,
                )
        finally:
            if hook is not None:
                hook.remove()
        results, start = [], 0
        for item, generation in zip(prepared, generations, strict=True):
            own = rows[start : start + generation.request.sampling.n]
            start += len(own)
            for row in own:
                row.finish("length")  # a row still open ran to the batch's end: its own max_tokens
            results.append(Result(choices=[row.choice() for row in own], prompt_tokens=item.prompt_tokens))
        return results

    @staticmethod
    def is_oom(exc: BaseException) -> bool:
        return _is_oom(exc)

    def free_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
