"""ASGI entry point: HTTP (Django), the agent socket and the VNC socket."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamspace.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path, re_path  # noqa: E402

from agent_clients import protocol  # noqa: E402
from agents_app.consumers import AgentConsumer  # noqa: E402
from streamspace import body_limit, daphne_close_reason, daphne_streaming, log_redaction, structured_logs  # noqa: E402
from vnc_app import file_transfer  # noqa: E402
from vnc_app.audio import AudioConsumer  # noqa: E402
from vnc_app.auth import JWTQueryAuthMiddleware  # noqa: E402
from vnc_app.consumers import VncConsumer  # noqa: E402

daphne_close_reason.apply()
body_limit.apply()
daphne_streaming.apply()  # after body_limit: file uploads stream (and have their own limit)
log_redaction.apply_to_daphne_access_log()  # no ?token= value in Daphne's access log
if settings.LOG_FORMAT == "json":
    structured_logs.daphne_access_log_as_records()


async def no_such_socket(scope, receive, send):
    """Any other socket path: accepted, then closed with 4404 and a reason (a handshake
    refused outright reaches the client as a bare HTTP 403; an unrouted one as a 500)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": protocol.CLOSE_NOT_FOUND, "reason": "no such socket path"})


websocket_routes = URLRouter(
    [
        path("api/v1/agent/connect", AgentConsumer.as_asgi()),
        # Any spelling of a session id, as on the REST API: the same selector decides what
        # it names (an upper-case UUID is that session; no UUID at all: 4404 no such session).
        path("api/v1/vnc/<str:session_id>", AuthMiddlewareStack(JWTQueryAuthMiddleware(VncConsumer.as_asgi()))),
        # The desktop's sound (templates with sound): the same authentication and checks.
        path("api/v1/audio/<str:session_id>", AuthMiddlewareStack(JWTQueryAuthMiddleware(AudioConsumer.as_asgi()))),
        re_path(r"", no_such_socket),
    ]
)

# RequestId outermost: a request refused by BodyLimit has its id too.
# File transfers stream past BodyLimit (vnc_app.file_transfer: FILE_TRANSFER_MAX_BYTES, checked before a byte is read).
http = structured_logs.RequestId(
    file_transfer.route(file_transfer.application(django_asgi_app), body_limit.BodyLimit(django_asgi_app))
)
application = ProtocolTypeRouter({"http": http, "websocket": websocket_routes})
