from django.apps import AppConfig


class VncAppConfig(AppConfig):
    name = "vnc_app"
    verbose_name = "VNC"
