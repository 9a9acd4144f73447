"""``WS /ws/v1/infer``: token-by-token answers over a websocket. Thin: auth, admission and dispatch
are the same services the REST API uses; this class only speaks the frames.

Client frames: ``{"type": "auth", "api_key": ...}`` (first, within WS_AUTH_TIMEOUT_SECONDS, unless
a header or the dashboard session authenticated),
``{"type": "infer", "prompt", "image"? (base64 or a data URI, or a list of them), "max_tokens"?, "temperature"?,
"top_p"?, "model"?}`` or ``{"type": "infer", "messages" (OpenAI's chat form), ...}``, with any decoding field of chat
completions (``stop``, ``seed``, ``n``, ``tools``, ``response_format``, ``chat_template_kwargs`` or
``reasoning_effort`` for thinking, ...; ``temperature`` and ``top_p`` keep this endpoint's defaults),
``{"type": "cancel"}``. Server frames: ``ready``, ``queued`` (with ``query_id``), ``reasoning``
(``text``: the model's thinking), ``token`` (``text``: the answer), ``tool_call`` (``tool_call``),
``done`` (``result``, ``reasoning``, ``tool_calls``, ``usage``, ``cost_time``, ``finish_reason``) or ``error``
(``code``, ``message``,
``param``?).

The key's state (revoked, expired, tenant disabled; for the dashboard session, the membership) is
read again from the database on every ``infer``: a socket outlives the moment it authenticated.
Every bad frame gets an ``error`` frame and the socket stays usable, except a frame over
MAX_WS_FRAME_BYTES (``payload_too_large``, then close 1009) and a key that may no longer be used
(closed 4401/4403). A key holds at most MAX_SOCKETS_PER_KEY sockets open (inference/sockets.py).

The connection joins only the channel-layer group of the query it started, before dispatching
it, so it sees every token of its own query and nothing of anyone else's. One query runs at a time
per connection. Closing the connection cancels the running query.
"""

import asyncio
import logging
import uuid

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from accounts import dashboard
from accounts import services as accounts
from config.errors import ApiError
from inference import chat, events, parameters, parsers, services, sockets
from inference.models import Query

logger = logging.getLogger("sightline.websocket")

# Close codes: 1009 "message too big" and 1013 "try again later" are the protocol's own; 4000 +
# the HTTP status for refusals that have one.
CLOSE_CODES = {
    "payload_too_large": 1009,
    "service_unavailable": 1013,
    "unauthorized": 4401,
    "key_revoked": 4401,
    "key_expired": 4401,
    "forbidden": 4403,
    "rate_limited": 4429,
}
FRAME_TYPES = "'auth', 'infer' or 'cancel'"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError("invalid_request", message, param=param)


def decode_frame(text_data: str | None) -> dict:
    """A client frame as a JSON object, or ``ApiError`` saying what is wrong with it."""
    if text_data is None:
        raise _bad('Binary frames are not accepted; send JSON text frames like {"type": "infer", ...}.')
    limit = settings.MAX_WS_FRAME_BYTES
    if len(text_data) > limit or (len(text_data) * 4 > limit and len(text_data.encode("utf-8", "replace")) > limit):
        raise ApiError("payload_too_large", f"A frame may be at most {limit:,} bytes; send a smaller image.")
    content = parsers.loads(text_data, where="frame")  # the same checks as every HTTP body
    if not isinstance(content.get("type"), str):
        raise _bad(f"The frame's 'type' must be {FRAME_TYPES}.", "type")
    return content


def _decoding(content: dict) -> dict:
    """The chat decoding fields of an ``infer`` frame (checked as chat completions checks them);
    the sampling values it leaves out keep this endpoint's documented defaults (greedy)."""
    fields = {key: value for key, value in content.items() if key not in ("temperature", "top_p")}
    decoding = parameters.decoding(fields)
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if decoding.get(key) is None:
            decoding.pop(key, None)
    return decoding


class InferConsumer(AsyncJsonWebsocketConsumer):
    api_key = None
    session_user = None  # the dashboard user, when the session authenticated the socket
    socket_id: str | None = None  # this socket's place in its key's count of open sockets
    query_id: str | None = None
    group: str | None = None
    closing = False

    async def connect(self):
        await self.accept()
        self._tasks: list[asyncio.Task] = []
        try:
            plaintext = accounts.key_from_headers(
                _header(self.scope, b"authorization"), _header(self.scope, b"x-api-key")
            )
            if plaintext is not None:
                api_key = await database_sync_to_async(accounts.authenticate_key)(plaintext)
            else:  # the dashboard's playground: the signed-in session
                api_key = await database_sync_to_async(dashboard.session_api_key)(
                    self.scope.get("user"), self.scope.get("session")
                )
                if api_key is not None:
                    self.session_user = self.scope.get("user")
            if api_key is not None:
                await self._authenticated(api_key)
            else:
                self._tasks.append(asyncio.create_task(self._auth_deadline()))
        except ApiError as error:
            await self._refuse(error)

    async def disconnect(self, code):
        self.closing = True
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if self.query_id is not None:
            await database_sync_to_async(services.cancel)(self.query_id)
        await self._leave()
        if self.socket_id is not None:
            try:
                await asyncio.to_thread(sockets.release, self.api_key.pk, self.socket_id)
            except Exception:  # Redis away: the place frees itself when its lease ends
                logger.warning("could not release the socket of key %s", self.api_key.pk, exc_info=True)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # Replaces AsyncJsonWebsocketConsumer's: its decoding raises on a bad frame, which ends
        # the connection with 1011; here every bad frame is answered and the socket stays usable.
        if self.closing:
            return
        try:
            await self.receive_json(decode_frame(text_data))
        except ApiError as error:
            if error.code == "payload_too_large":
                await self._refuse(error)
            else:
                await self._error(error)
        except Exception:
            logger.exception("websocket frame failed")
            await self._error(ApiError("internal_error", "The server failed on this frame; it has been logged."))

    async def receive_json(self, content, **kwargs):
        kind = content["type"]
        if kind == "auth":
            await self._auth(content)
        elif self.api_key is None:
            raise ApiError("unauthorized", 'Authenticate first: send {"type": "auth", "api_key": "sl_..."}.')
        elif kind == "infer":
            await self._infer(content)
        elif kind == "cancel":
            if self.query_id is not None:
                await database_sync_to_async(services.cancel)(self.query_id)
        else:
            raise _bad(f"Unknown frame type; send {FRAME_TYPES}.", "type")

    async def _auth(self, content):
        if self.api_key is not None:
            raise _bad("This connection is authenticated already.")
        plaintext = content.get("api_key")
        if not isinstance(plaintext, str) or not plaintext:
            raise ApiError("unauthorized", "The auth frame needs 'api_key'.")
        try:
            api_key = await database_sync_to_async(accounts.authenticate_key)(plaintext)
            await self._authenticated(api_key)
        except ApiError as error:
            await self._refuse(error)

    async def _authenticated(self, api_key):
        """Take the socket's place in its key's count (or refuse it), then say ``ready``."""
        socket_id = uuid.uuid4().hex
        await asyncio.to_thread(sockets.acquire, api_key.pk, socket_id)
        self.api_key, self.socket_id = api_key, socket_id
        self._tasks.append(asyncio.create_task(self._renew_lease()))
        await self.send_json({"type": "ready"})

    async def _recheck(self):
        """The key as the database has it now; raises if it may no longer be used."""
        if self.session_user is not None:
            recheck = database_sync_to_async(dashboard.recheck_session_key)
            self.api_key = await recheck(self.session_user, self.api_key.pk)
        else:
            self.api_key = await database_sync_to_async(accounts.recheck_key)(self.api_key.pk)

    async def _infer(self, content):
        if self.query_id is not None:
            raise _bad("A query is running on this connection; wait for it or send 'cancel'.")
        try:
            await self._recheck()
        except ApiError as error:
            await self._refuse(error)
            return
        # prompt + image(s), or messages; off the event loop (base64 decoding, an allowed remote URL)
        conversation = await asyncio.to_thread(chat.conversation_from, content)
        client = services.ClientInfo(
            ip=(self.scope.get("client") or [None])[0], user_agent=_header(self.scope, b"user-agent") or ""
        )
        query = await database_sync_to_async(services.submit)(
            self.api_key,
            endpoint=Query.Endpoint.WEBSOCKET,
            client=client,
            model=content.get("model"),
            **conversation,
            max_tokens=content.get("max_tokens"),
            temperature=content.get("temperature"),
            top_p=content.get("top_p"),
            extra_params=_decoding(content),
        )
        self.query_id = str(query.pk)
        self.group = events.group_name(query.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)  # subscribe before dispatch
        await self.send_json({"type": "queued", "query_id": self.query_id})
        await database_sync_to_async(services.dispatch)(query)

    # --- timers ---------------------------------------------------------------------------------
    async def _auth_deadline(self):
        await asyncio.sleep(settings.WS_AUTH_TIMEOUT_SECONDS)
        if self.api_key is None and not self.closing:
            await self._refuse(
                ApiError(
                    "unauthorized",
                    f"No key within {settings.WS_AUTH_TIMEOUT_SECONDS:g} s: send "
                    '{"type": "auth", "api_key": "sl_..."} first, or an Authorization header.',
                )
            )

    async def _renew_lease(self):
        while True:
            await asyncio.sleep(sockets.renew_every())
            try:
                await asyncio.to_thread(sockets.renew, self.api_key.pk, self.socket_id)
            except Exception:  # Redis away for a moment: the next renewal may succeed within the lease
                logger.warning("could not renew the socket lease of key %s", self.api_key.pk, exc_info=True)

    # --- messages from the worker, through the channel layer -----------------------------------
    async def query_started(self, event):
        await self.send_json({"type": "started", "query_id": event["query_id"]})

    async def query_token(self, event):
        """The answer's text as ``token`` frames, the thinking as ``reasoning`` frames, in order."""
        for piece in event["pieces"]:
            # Which choice, when a frame asked for several (n > 1).
            choice = {"index": piece["choice"]} if piece["choice"] else {}
            if piece["reasoning"]:
                await self.send_json(
                    {"type": "reasoning", "query_id": event["query_id"], "text": piece["reasoning"], **choice}
                )
            if piece["text"]:
                await self.send_json({"type": "token", "query_id": event["query_id"], "text": piece["text"], **choice})
            for call in piece["tool_calls"]:
                await self.send_json({"type": "tool_call", "query_id": event["query_id"], "tool_call": call, **choice})

    async def query_done(self, event):
        await self._leave()
        await self.send_json(
            {
                "type": "done",
                "query_id": event["query_id"],
                "result": event["result"],
                "reasoning": event["reasoning"],
                "tool_calls": event["tool_calls"],
                "finish_reason": event["finish_reason"],
                "usage": event["usage"],
                "cost_time": event["cost_time"],
            }
        )

    async def query_error(self, event):
        await self._leave()
        await self.send_json(
            {"type": "error", "query_id": event["query_id"], "code": event["code"], "message": event["message"]}
        )

    # --- helpers -------------------------------------------------------------------------------
    async def _leave(self):
        if self.group is not None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        self.group = None
        self.query_id = None

    async def _error(self, error: ApiError):
        frame = {"type": "error", "code": error.code, "message": error.message}
        if error.param is not None:
            frame["param"] = error.param
        if error.query_id is not None:
            frame["query_id"] = str(error.query_id)
        await self.send_json(frame)

    async def _refuse(self, error: ApiError):
        """An error frame, then close: the socket may not go on."""
        self.closing = True
        await self._error(error)
        await self.close(code=CLOSE_CODES.get(error.code, 4400))
