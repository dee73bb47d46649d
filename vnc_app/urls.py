from django.urls import path

from vnc_app import views

app_name = "vnc"

urlpatterns = [
    path("vnc-viewer/<str:session_id>", views.viewer, name="viewer"),
]
