from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework_simplejwt.views import TokenRefreshView

from agents_app import api as agents_api
from sessions_app import api as sessions_api
from streamspace import health, metrics
from streamspace.login_throttle import TokenObtainView
from vnc_app import file_api as files_api

api_v1 = [
    path("auth/token", TokenObtainView.as_view(), name="token"),
    path("auth/token/refresh", TokenRefreshView.as_view(), name="token-refresh"),
    path("templates", sessions_api.TemplateListView.as_view(), name="templates"),
    path("sessions", sessions_api.SessionListCreateView.as_view(), name="sessions"),
    path("sessions/<str:session_id>", sessions_api.SessionDetailView.as_view(), name="session"),
    path("sessions/<str:session_id>/hibernate", sessions_api.SessionHibernateView.as_view(), name="session-hibernate"),
    path("sessions/<str:session_id>/wake", sessions_api.SessionWakeView.as_view(), name="session-wake"),
    path("sessions/<str:session_id>/keepalive", sessions_api.SessionKeepaliveView.as_view(), name="session-keepalive"),
    # Served by vnc_app.file_transfer (streamed); these views make its checks and the schema.
    path("sessions/<str:session_id>/files", files_api.FileListView.as_view(), name="session-files"),
    path("sessions/<str:session_id>/files/<path:file_path>", files_api.FileView.as_view(), name="session-file"),
    path("agents/register", agents_api.AgentRegisterView.as_view(), name="agent-register"),
    path("agents", agents_api.AgentListView.as_view(), name="agents"),
    path("agents/<str:agent_id>", agents_api.AgentDetailView.as_view(), name="agent"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view: Swagger UI's start-up script comes from /api/docs/?script, not inline (CSP).
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(url_name="schema", template_name="docs/swagger_ui.html"),
        name="swagger",
    ),
    path("healthz", health.healthz),
    path("readyz", health.readyz),
    path("healthz/sweeps", health.sweeps),
    path("metrics", metrics.metrics, name="metrics"),
    path("", include("sessions_app.urls")),
    path("", include("vnc_app.urls")),
]

# Django's error views: the API's JSON error body under /api/, Django's pages elsewhere.
handler400 = "streamspace.api_errors.bad_request"
handler403 = "streamspace.api_errors.permission_denied"
handler404 = "streamspace.api_errors.page_not_found"
handler500 = "streamspace.api_errors.server_error"
