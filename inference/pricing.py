"""Prices and costs of queries (config/money.py has the arithmetic and its rounding).

A model's price at an instant is its ``ModelPrice`` row with the latest ``effective_from`` at or
before that instant; a query costs what the price of its creation says, whenever it settles. A
model without a price row costs nothing (``money.FREE``)."""

from datetime import datetime
from decimal import Decimal

from config import money
from inference.models import ModelPrice, Query


def row_at(model: str, at: datetime) -> ModelPrice | None:
    return ModelPrice.objects.filter(model=model, effective_from__lte=at).order_by("-effective_from").first()


def price_of(row: ModelPrice | None) -> money.Price:
    if row is None:
        return money.FREE
    return money.Price(row.input_per_million, row.output_per_million, row.per_image)


def price_at(model: str, at: datetime) -> money.Price:
    """``model``'s price in effect at ``at`` (free when it has none)."""
    return price_of(row_at(model, at))


def worst_case(model: str, at: datetime, *, prompt_tokens: int, completion_tokens: int, images: int) -> Decimal:
    """What an admission reserves: the bounds of its tokens and its images at the price of ``at``, rounded up."""
    return money.worst_case(
        price_at(model, at), prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, images=images
    )


def recorded(price: money.Price) -> dict:
    """A price as a query row records it (``Query.price_*``)."""
    return {
        "price_input_per_million": price.input_per_million,
        "price_output_per_million": price.output_per_million,
        "price_per_image": price.per_image,
    }


def price_of_query(query: Query) -> money.Price:
    """The price of ``query``'s creation: as its admission recorded it on the row, else read again."""
    if query.price_input_per_million is None:
        return price_at(query.model, query.created_at)
    return money.Price(query.price_input_per_million, query.price_output_per_million, query.price_per_image)


def query_cost(query: Query, *, images: int | None = None) -> Decimal:
    """What a finished query costs: its tokens and its images at its model's price of its creation.
    Its images count only when the model read them (the worker wrote its prompt tokens): a query
    that failed or was cancelled before it ran costs nothing."""
    if query.prompt_tokens is None:
        images = 0
    elif images is None:
        images = query.images.count()
    return money.cost(
        price_of_query(query),
        prompt_tokens=query.prompt_tokens or 0,
        completion_tokens=query.completion_tokens or 0,
        images=images,
    )
