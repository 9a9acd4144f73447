"""What a worker asks of the engine, and what it gets back: plain data, no torch.

Shared by the web tier (which checks and stores a request's parameters), the runner (which builds
an ``EngineRequest`` from a stored query) and the engine (which decodes it).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters, OpenAI's and vLLM's names. ``None`` means the model's generation_config."""

    max_new_tokens: int = 256
    temperature: float | None = None  # 0 (or below 1e-5) is greedy
    top_p: float | None = None
    top_k: int | None = None  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)


@dataclass(frozen=True)
class EngineRequest:
    """One query: a conversation in the chat template's form, its images in order, how to decode.

    ``messages``: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str | [parts], ...}]``
    where parts are ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` (the k-th image part
    stands for ``images[k]``); assistant messages may carry ``tool_calls`` (OpenAI's shape, with
    ``arguments`` a JSON string or an object) and ``reasoning_content``; tool messages carry
    ``tool_call_id`` and text ``content``.
    """

    messages: list
    images: list = field(default_factory=list)  # PIL images
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tools: list | None = None  # OpenAI's [{"type": "function", "function": {...}}]
    tool_choice: str | dict | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    response_format: dict | None = None  # {"type": "json_object"} | {"type": "json_schema", ...}
    enable_thinking: bool = False


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass
class Delta:
    """A piece of one choice's output, as the stream produces it."""

    index: int = 0  # the choice
    text: str = ""  # answer text (box markers and tool-call text removed)
    reasoning: str = ""  # thinking text
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed in this piece
    logprobs: list[dict] = field(default_factory=list)  # OpenAI's per-token entries for this piece


@dataclass
class Choice:
    index: int
    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    completion_tokens: int
    reasoning_tokens: int = 0
    logprobs: list[dict] | None = None


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(choice.reasoning_tokens for choice in self.choices)
