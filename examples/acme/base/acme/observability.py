"""The fixture's observability hooks: who sees django-debug-toolbar."""


def show_toolbar(request):
    """Logged-in superusers only (settings: DJANGO_DEBUG_TOOLBAR=1, staging)."""
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_superuser)
