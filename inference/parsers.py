"""The JSON parser of every API view: a body is one JSON object of clean text and finite numbers,
or a 400 naming the field. DRF's own parser lets non-objects (``[1]``, ``5``) through to views
that then fail on them, and lets a RecursionError (100,000 nested brackets) escape as a 500."""

import json

from rest_framework.parsers import JSONParser

from config.errors import ApiError
from inference import validation


class JSONObjectParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            document = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ApiError("invalid_request", "The JSON body is nested too deeply.", param="body") from None
        return validation.check_json(document, where="body")


def loads(text: str | bytes, *, where: str = "frame") -> dict:
    """A JSON text (e.g. a websocket frame) parsed and checked as ``JSONObjectParser`` does."""
    try:
        # NaN and Infinity parse to floats here so that check_json can name the field that holds one.
        document = json.loads(text)
    except RecursionError:
        raise ApiError("invalid_request", f"The {where} is nested too deeply.", param=where) from None
    except ValueError as exc:  # JSONDecodeError, undecodable bytes, integers of more than 4300 digits
        raise ApiError(
            "invalid_request", f'The {where} is not JSON ({exc}); send a JSON object like {{"type": ...}}.', param=where
        ) from None
    return validation.check_json(document, where=where)
