"""What a successful login records besides the Django user.

v2: the profile gained ``last_login_at`` and ``display_name``; a login stamps
the former and fills the latter when the backfill could not (profile created
after the migration by old code during the rolling deploy).
"""

from django.utils import timezone

from profiles.models import Profile


def after_login(customer, user):
    profile, _ = Profile.objects.get_or_create(customer=customer)
    update = {"last_login_at": timezone.now()}
    if not profile.display_name:
        update["display_name"] = customer.full_name or customer.email
    Profile.objects.filter(pk=profile.pk).update(**update)
