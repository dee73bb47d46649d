from django.contrib.auth import views as auth_views
from django.urls import path

from sessions_app import views

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
]
