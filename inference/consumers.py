"""``WS /ws/v1/infer``: token-by-token answers over a websocket. Thin: auth, admission and dispatch
are the same services the REST API uses; this class only speaks the frames.

Client frames: ``{"type": "auth", "api_key": ...}`` (first, unless a header or the dashboard
session authenticated),
``{"type": "infer", "prompt", "image" (base64 or data URI), "max_tokens"?, "temperature"?, "top_p"?}``,
``{"type": "cancel"}``. Server frames: ``ready``, ``queued`` (with ``query_id``), ``token`` (``text``),
``done`` (``result``, ``usage``, ``cost_time``, ``finish_reason``) or ``error`` (``code``, ``message``).

The connection joins only the channel-layer group of the query it started, before dispatching
it, so it sees every token of its own query and nothing of anyone else's. One query runs at a time
per connection. Closing the connection cancels the running query.
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from accounts import dashboard
from accounts import services as accounts
from config.errors import ApiError
from inference import events, services
from inference.images import decode_base64_image
from inference.models import Query


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class InferConsumer(AsyncJsonWebsocketConsumer):
    api_key = None
    query_id: str | None = None
    group: str | None = None

    async def connect(self):
        await self.accept()
        try:
            plaintext = accounts.key_from_headers(
                _header(self.scope, b"authorization"), _header(self.scope, b"x-api-key")
            )
            if plaintext is not None:
                self.api_key = await database_sync_to_async(accounts.authenticate_key)(plaintext)
            else:  # the dashboard's playground: the signed-in session
                self.api_key = await database_sync_to_async(dashboard.session_api_key)(
                    self.scope.get("user"), self.scope.get("session")
                )
        except ApiError as error:
            await self._refuse(error)
            return
        if self.api_key is not None:
            await self.send_json({"type": "ready"})

    async def disconnect(self, code):
        if self.query_id is not None:
            await database_sync_to_async(services.cancel)(self.query_id)
        await self._leave()

    async def receive_json(self, content, **kwargs):
        kind = content.get("type") if isinstance(content, dict) else None
        try:
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
                raise ApiError("invalid_request", "Unknown frame type; send 'auth', 'infer' or 'cancel'.")
        except ApiError as error:
            await self._error(error)

    async def _auth(self, content):
        if self.api_key is not None:
            raise ApiError("invalid_request", "This connection is authenticated already.")
        plaintext = content.get("api_key")
        if not isinstance(plaintext, str) or not plaintext:
            raise ApiError("unauthorized", "The auth frame needs 'api_key'.")
        try:
            self.api_key = await database_sync_to_async(accounts.authenticate_key)(plaintext)
        except ApiError as error:
            await self._refuse(error)
            return
        await self.send_json({"type": "ready"})

    async def _infer(self, content):
        if self.query_id is not None:
            raise ApiError("invalid_request", "A query is running on this connection; wait for it or send 'cancel'.")
        image = content.get("image")
        image_bytes = decode_base64_image(image) if image else None
        client = services.ClientInfo(
            ip=(self.scope.get("client") or [None])[0], user_agent=_header(self.scope, b"user-agent") or ""
        )
        query = await database_sync_to_async(services.submit)(
            self.api_key,
            endpoint=Query.Endpoint.WEBSOCKET,
            client=client,
            prompt=content.get("prompt"),
            image_bytes=image_bytes,
            max_tokens=content.get("max_tokens"),
            temperature=content.get("temperature"),
            top_p=content.get("top_p"),
        )
        self.query_id = str(query.pk)
        self.group = events.group_name(query.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)  # subscribe before dispatch
        await self.send_json({"type": "queued", "query_id": self.query_id})
        await database_sync_to_async(services.dispatch)(query)

    # --- messages from the worker, through the channel layer -----------------------------------
    async def query_started(self, event):
        await self.send_json({"type": "started", "query_id": event["query_id"]})

    async def query_token(self, event):
        await self.send_json({"type": "token", "query_id": event["query_id"], "text": event["text"]})

    async def query_done(self, event):
        await self._leave()
        await self.send_json(
            {
                "type": "done",
                "query_id": event["query_id"],
                "result": event["result"],
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
        if error.query_id is not None:
            frame["query_id"] = str(error.query_id)
        await self.send_json(frame)

    async def _refuse(self, error: ApiError):
        await self._error(error)
        await self.close(code=4401)
