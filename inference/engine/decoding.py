"""Decoding one request's choices inside transformers' ``generate``: every sampling parameter,
structured outputs, stop strings, logprobs and the per-choice stream.

transformers' ``generate`` keeps what it is good at — the model's cache, GLM's multimodal rope
positions, padding of finished rows — and we take the two decisions that are ours:

- **which token** (``Sampler``, the last logits processor): for each row (a choice) it applies the
  penalties, the grammar's mask, then greedy or seeded sampling with temperature, top-k, top-p and
  min-p, records the logprobs, and hands back scores where only the chosen token is finite, so
  ``generate``'s own greedy step picks it. One ``torch.Generator`` per row makes ``seed`` exact
  (same seed, same request, same answer) whatever else runs in the process.
- **when a row ends and what it says** (``Steps``, a stopping criterion called after each token):
  it detokenizes incrementally, holds back text that could start a stop string, feeds GLM's
  output parser (reasoning, tool calls, box markers), and ends the row on EOS, a stop string,
  its grammar's end, ``max_tokens`` or a cancel.
"""

import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, StoppingCriteria

from inference.engine.core import FORCE_TEST_OUTPUT_ENV
from inference.engine.output import OutputParser
from inference.engine.request import Choice, Delta, SamplingParams

_NEG_INF = float("-inf")
# OpenAI's logprobs never carry -inf (JSON has no such number); this stands for "impossible".
_MIN_LOGPROB = -9999.0


def forced_output(conversation_text: str) -> str | None:
    import json

    raw = os.environ.get(FORCE_TEST_OUTPUT_ENV, "")
    if not raw:
        return None
    for marker, text in json.loads(raw).items():
        if marker and marker in conversation_text:
            return text
    return None


class Row:
    """One choice being decoded: its parameters, random generator, grammar, text and stream state."""

    def __init__(
        self,
        *,
        index: int,
        sampling: SamplingParams,
        defaults: dict,
        tokenizer,
        vocab_size: int,
        eos_ids: set[int],
        prompt_ids: list[int],
        matcher=None,
        forced: list[int] | None = None,
        parser: OutputParser,
        think_ids: tuple[int | None, int | None],
        out,  # where its pieces go: the query's Generation (anything with put(delta))
    ):
        self.index = index
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.out = out
        self.max_new_tokens = sampling.max_new_tokens
        temperature = sampling.temperature if sampling.temperature is not None else defaults.get("temperature", 1.0)
        self.greedy = temperature is None or temperature < 1e-5
        self.temperature = temperature or 1.0
        self.top_p = sampling.top_p if sampling.top_p is not None else defaults.get("top_p") or 1.0
        top_k = sampling.top_k if sampling.top_k is not None else defaults.get("top_k") or 0
        self.top_k = top_k if top_k and top_k > 0 else 0
        self.min_p = sampling.min_p or 0.0
        penalty = sampling.repetition_penalty
        self.repetition_penalty = (penalty if penalty is not None else defaults.get("repetition_penalty")) or 1.0
        self.logit_bias = [(token, bias) for token, bias in sampling.logit_bias if 0 <= token < vocab_size]
        self.presence_penalty = sampling.presence_penalty or 0.0
        self.frequency_penalty = sampling.frequency_penalty or 0.0
        self.logprobs = sampling.logprobs
        self.top_logprobs = sampling.top_logprobs if sampling.logprobs else 0
        self.stops = tuple(s for s in sampling.stop if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self.vocab_size = vocab_size
        # seed + index: the choices of one seeded request differ from each other, and repeat.
        seed = sampling.seed + index if sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed % (2**63))
        self.matcher = matcher
        self.forced = deque(forced) if forced is not None else None
        self.parser = parser
        self.think_start, self.think_end = think_ids
        # Reasoning tokens: from <think> to </think>, both counted (GLM opens it itself when thinking).
        self.in_think = False
        self.reasoning_tokens = 0
        self.seen = set(prompt_ids)  # for repetition_penalty (prompt and output, as vLLM and HF)
        self.counts: dict[int, int] = {}  # output token counts, for presence/frequency penalties
        self.tokens: list[int] = []
        self.eos_generated = False
        self.finished = False
        self.finish_reason = ""
        self.entries: list[dict] = []  # all logprobs entries
        self._pending_entries: list[dict] = []
        self._last_entry: dict | None = None
        self._prefix_offset = 0
        self._read_offset = 0
        self._buffer = ""  # decoded text not yet released (could start a stop string)

    # --- choosing the next token ------------------------------------------------------------

    def _penalised(self, scores: torch.Tensor) -> torch.Tensor:
        for token, bias in self.logit_bias:
            scores[token] += bias
        if self.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(i for i in self.seen if i < scores.shape[0]), dtype=torch.long)
            picked = scores[ids]
            scores[ids] = torch.where(picked > 0, picked / self.repetition_penalty, picked * self.repetition_penalty)
        if (self.presence_penalty or self.frequency_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            counts = torch.tensor(list(self.counts.values()), dtype=scores.dtype)
            scores[ids] -= self.frequency_penalty * counts + self.presence_penalty
        return scores

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.torch

        bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, 0)
        allowed = torch.zeros(1, self.vocab_size)
        llguidance.torch.apply_token_bitmask_inplace(allowed, bitmask)
        allowed = allowed[0, : scores.shape[0]] == 0
        masked = torch.where(allowed, scores, torch.full_like(scores, _NEG_INF))
        if torch.isinf(masked).all():
            # Every token the grammar allows was ruled out before us (a model's suppressed tokens,
            # such as EOS for the tiny test model): the grammar wins; prefer ending.
            masked = torch.where(allowed, torch.zeros_like(scores), masked)
            for eos in self.eos_ids:
                if eos < masked.shape[0] and allowed[eos]:
                    masked = torch.full_like(scores, _NEG_INF)
                    masked[eos] = 0.0
                    break
        return masked

    def _sample(self, scores: torch.Tensor) -> int:
        if self.greedy:
            return int(torch.argmax(scores))
        scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[0]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = torch.where(scores < kth, torch.full_like(scores, _NEG_INF), scores)
        probs = torch.softmax(scores, dim=-1)
        if self.min_p > 0:
            probs = torch.where(probs < self.min_p * probs.max(), torch.zeros_like(probs), probs)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > self.top_p  # keep the smallest set reaching top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        if float(probs.sum()) <= 0:
            return int(torch.argmax(scores))
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))

    def _entry(self, token: int, logprobs: torch.Tensor) -> dict:
        def one(token_id: int, value: float) -> dict:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            value = _MIN_LOGPROB if math.isinf(value) or math.isnan(value) else max(value, _MIN_LOGPROB)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        entry = one(token, float(logprobs[token]))
        top = []
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, self.top_logprobs)
            top = [one(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
        entry["top_logprobs"] = top
        return entry

    def choose(self, scores: torch.Tensor) -> int:
        """The next token of this row, from the scores transformers' own processors left."""
        scores = scores.float()
        logprobs = torch.log_softmax(scores, dim=-1) if self.logprobs else None
        if self.forced is not None:
            token = self.forced.popleft() if self.forced else min(self.eos_ids)
        else:
            candidates = self._penalised(scores.clone())
            if self.matcher is not None and not self.in_think:
                candidates = self._mask(candidates)
            token = self._sample(candidates)
        self._last_entry = self._entry(token, logprobs) if logprobs is not None else None
        return token

    # --- after the token was chosen ---------------------------------------------------------

    def accept(self, token: int) -> None:
        if self.finished:
            return
        if token in self.eos_ids:
            self.eos_generated = True
            self.finish("stop")
            return
        self.tokens.append(token)
        self.seen.add(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._last_entry is not None:
            self.entries.append(self._last_entry)
            self._pending_entries.append(self._last_entry)
        if self.in_think:
            self.reasoning_tokens += 1
            if token == self.think_end:
                self.in_think = False
        elif token == self.think_start:
            self.in_think = True
            self.reasoning_tokens += 1
        if self.matcher is not None and not self.in_think and token != self.think_end:
            self.matcher.consume_token(token)
        self._detokenize()
        if self.finished:
            return
        if self.matcher is not None and self.matcher.is_stopped():
            self.finish("stop")
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish("length")

    def _detokenize(self) -> None:
        # Incremental detokenization (as vLLM does it): decode a short window of tokens, and keep a
        # piece back while it ends in an incomplete UTF-8 character.
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self.tokens[self._prefix_offset :], skip_special_tokens=False)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            self._emit("")
            return
        self._buffer += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.tokens)
        for stop in self.stops:
            at = self._buffer.find(stop)
            if at >= 0:
                self._buffer = self._buffer[:at]
                self.finish("stop")  # the stop text never reaches the client
                return
        keep = self._hold
        released, self._buffer = (self._buffer[:-keep], self._buffer[-keep:]) if keep else (self._buffer, "")
        self._emit(released)

    def _emit(self, text: str, *, final: bool = False) -> None:
        delta = self.parser.feed(text) if text else Delta()
        if final:
            tail = self.parser.finish()
            delta.text += tail.text
            delta.reasoning += tail.reasoning
            delta.tool_calls.extend(tail.tool_calls)
        delta.index = self.index
        delta.logprobs = self._pending_entries
        self._pending_entries = []
        if delta.text or delta.reasoning or delta.tool_calls or delta.logprobs:
            self.out.put(delta)

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.finish_reason = reason
        text, self._buffer = self._buffer, ""
        self._emit(text, final=True)

    def choice(self) -> Choice:
        tool_calls = list(self.parser.tool_calls)
        reason = self.finish_reason or "length"
        if reason == "stop" and tool_calls:
            reason = "tool_calls"
        return Choice(
            index=self.index,
            text=self.parser.text,
            reasoning=self.parser.reasoning,
            tool_calls=tool_calls,
            finish_reason=reason,
            completion_tokens=len(self.tokens) + (1 if self.eos_generated else 0),
            reasoning_tokens=self.reasoning_tokens,
            logprobs=self.entries if self.logprobs else None,
        )


class Sampler(LogitsProcessor):
    """The last logits processor: each row's token is chosen here; only it stays finite."""

    def __init__(self, rows: list[Row], pad_id: int):
        self.rows = rows
        self.pad_id = pad_id

    def __call__(self, input_ids, scores):
        chosen = torch.full_like(scores, _NEG_INF)
        host = scores.detach().to("cpu", torch.float32)
        for b, row in enumerate(self.rows):
            token = self.pad_id if row.finished else row.choose(host[b])
            chosen[b, token] = 0.0
        return chosen


class Steps(StoppingCriteria):
    """After each token: every row takes its token; a row that ended stops (the others go on).
    ``groups``: each query's rows and its ``should_stop``, asked once per step while it runs."""

    def __init__(
        self, rows: list[Row], groups: list[tuple[list[Row], Callable[[], bool] | None]], *, step_delay: float = 0
    ):
        self.rows = rows
        self.groups = groups
        self.step_delay = step_delay  # test-only (core.SLOW_TEST_MARKER_ENV); 0 in production

    def __call__(self, input_ids, scores, **kwargs):
        if self.step_delay:
            time.sleep(self.step_delay)
        last = input_ids[:, -1].tolist()
        for b, row in enumerate(self.rows):
            row.accept(int(last[b]))
        # Asked after the step's token is taken: that token is the query's last one.
        for own, should_stop in self.groups:
            if should_stop is not None and not all(row.finished for row in own) and should_stop():
                for row in own:
                    row.finish("cancelled")
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)
