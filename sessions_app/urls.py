from django.contrib.auth import views as auth_views
from django.urls import path

from sessions_app import dashboard, views

app_name = "portal"

urlpatterns = [
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(template_name="registration/login.html", redirect_authenticated_user=True),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.home, name="home"),
    path("sessions/rows", views.session_rows, name="session-rows"),
    path("sessions/launch", views.session_launch, name="session-launch"),
    path(
        "sessions/<str:session_id>/<str:action>",
        views.session_action,
        name="session-action",
    ),
    path("dashboard/", dashboard.dashboard_home, name="dashboard"),
    path("dashboard/live", dashboard.dashboard_live, name="dashboard-live"),
    path("dashboard/agents/<str:agent_id>/", dashboard.agent_page, name="dashboard-agent"),
    path("dashboard/agents/<str:agent_id>/<str:action>", dashboard.agent_action, name="dashboard-agent-action"),
    path("dashboard/sessions/", dashboard.session_list, name="dashboard-sessions"),
    path("dashboard/sessions/<str:session_id>/", dashboard.session_page, name="dashboard-session"),
    path(
        "dashboard/sessions/<str:session_id>/<str:action>",
        dashboard.session_action,
        name="dashboard-session-action",
    ),
]
