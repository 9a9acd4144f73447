"""Money: prices, costs and budgets as ``Decimal`` in the currency of ``settings.CURRENCY``, never float.

* A cost is ``prompt_tokens × input/1e6 + completion_tokens × output/1e6 + images × per_image``,
  computed exactly and rounded once, to the nearest 10^-9 of the currency (``QUANTUM``), halves
  away from zero (``ROUND_HALF_UP``).
* A reservation (the worst case, reserved at admission against a budget) is rounded **up** to
  the quantum (``ROUND_CEILING``), so a query's cost never exceeds what was reserved for it.
* Counters in Redis hold integer nano-units (10^-9 of the currency): ``to_nano``/``from_nano``.
  Lua numbers are doubles, exact up to 2^53 nano-units (about 9,007,199 units of the currency), so
  budgets are capped at ``MAX_BUDGET``.
"""

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Context, Decimal, localcontext

QUANTUM = Decimal("0.000000001")
NANO = 10**9
MILLION = Decimal(1_000_000)
MAX_BUDGET = Decimal(9_000_000)
ZERO = Decimal("0E-9")
# Enough digits for any product of a token count and a price (the default context keeps 28).
_CONTEXT = Context(prec=60)


@dataclass(frozen=True)
class Price:
    """A model's prices: per million input (prompt) tokens, per million output tokens, per image."""

    input_per_million: Decimal = Decimal(0)
    output_per_million: Decimal = Decimal(0)
    per_image: Decimal = Decimal(0)


FREE = Price()


def _exact(price: Price, prompt_tokens: int, completion_tokens: int, images: int) -> Decimal:
    for value in (prompt_tokens, completion_tokens, images):
        if isinstance(value, float) or isinstance(value, bool):
            raise TypeError("token and image counts are whole numbers")
    with localcontext(_CONTEXT):
        return (
            Decimal(int(prompt_tokens)) * Decimal(price.input_per_million) / MILLION
            + Decimal(int(completion_tokens)) * Decimal(price.output_per_million) / MILLION
            + Decimal(int(images)) * Decimal(price.per_image)
        )


def cost(price: Price, *, prompt_tokens: int, completion_tokens: int, images: int) -> Decimal:
    """What a query costs, to the nearest 10^-9 (half up)."""
    with localcontext(_CONTEXT):
        return _exact(price, prompt_tokens, completion_tokens, images).quantize(QUANTUM, rounding=ROUND_HALF_UP)


def worst_case(price: Price, *, prompt_tokens: int, completion_tokens: int, images: int) -> Decimal:
    """A reservation: the cost of these upper bounds, rounded up to 10^-9."""
    with localcontext(_CONTEXT):
        return _exact(price, prompt_tokens, completion_tokens, images).quantize(QUANTUM, rounding=ROUND_CEILING)


def to_nano(amount: Decimal | None) -> int:
    """An amount (a multiple of 10^-9) in integer nano-units; refuses anything finer or a float."""
    if amount is None:
        return 0
    if not isinstance(amount, Decimal | int) or isinstance(amount, bool):
        raise TypeError(f"money is Decimal, not {type(amount).__name__}")
    with localcontext(_CONTEXT):
        scaled = Decimal(amount) * NANO
        if scaled != scaled.to_integral_value():
            raise ValueError(f"{amount} is finer than 10^-9")
        return int(scaled)


def from_nano(nano: int) -> Decimal:
    with localcontext(_CONTEXT):
        return (Decimal(int(nano)) / NANO).quantize(QUANTUM)


def quantized(amount) -> Decimal:
    """An amount (Decimal, or 0 for an empty sum) as a Decimal with the 9 decimals of the quantum."""
    with localcontext(_CONTEXT):
        return Decimal(amount or 0).quantize(QUANTUM)


def text(amount: Decimal | None) -> str | None:
    """An amount for JSON: a decimal string with 9 decimals (never a float); None stays None."""
    return None if amount is None else format(quantized(amount), "f")


def plain(amount: Decimal) -> str:
    """An amount without trailing zeros and never in exponent form: 0.3, 100, 0.000001."""
    text = format(Decimal(amount).normalize(), "f")
    return text


def fraction(spent: Decimal, budget: Decimal | None) -> Decimal | None:
    """spent / budget (None without a budget; a zero budget is spent at once)."""
    if budget is None:
        return None
    if budget <= 0:
        return Decimal(1)
    with localcontext(_CONTEXT):
        return spent / budget
