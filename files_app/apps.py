from django.apps import AppConfig


class FilesAppConfig(AppConfig):
    name = "files_app"
    verbose_name = "File transfers"
