from django.apps import AppConfig


class AcmeConfig(AppConfig):
    name = "acme"
    verbose_name = "ACME site"
