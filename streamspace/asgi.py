"""ASGI entry point: HTTP (Django), the agent socket and the VNC socket."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "streamspace.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from agents_app.consumers import AgentConsumer  # noqa: E402
from streamspace import daphne_close_reason, log_redaction  # noqa: E402
from vnc_app.auth import JWTQueryAuthMiddleware  # noqa: E402
from vnc_app.consumers import VncConsumer  # noqa: E402

daphne_close_reason.apply()
log_redaction.apply_to_daphne_access_log()  # no ?token= value in Daphne's access log

websocket_routes = URLRouter(
    [
        path("api/v1/agent/connect", AgentConsumer.as_asgi()),
        path("api/v1/vnc/<uuid:session_id>", AuthMiddlewareStack(JWTQueryAuthMiddleware(VncConsumer.as_asgi()))),
    ]
)

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_routes})
