from django.conf import settings


def release(request):
    """Expose the release id to every template (shown in the page footer)."""
    return {"release_id": settings.RELEASE_ID}
