from django.conf import settings
from django.contrib import admin
from django.urls import include, path

from acme import health, smoke
from cms import views as cms_views

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("smoke/profile/<int:customer_id>", smoke.profile, name="smoke-profile"),
    path("smoke/checkout", smoke.checkout, name="smoke-checkout"),
    path("pages/<slug:slug>", cms_views.page_detail, name="cms-page"),
    path("admin/", admin.site.urls),
    # Prometheus: GET /metrics (django-prometheus).
    path("", include("django_prometheus.urls")),
]
if settings.DEBUG_TOOLBAR:
    urlpatterns.append(path("__debug__/", include("debug_toolbar.urls")))
