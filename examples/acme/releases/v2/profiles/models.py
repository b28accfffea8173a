from django.db import models
from django.utils import timezone


class Profile(models.Model):
    """Per-customer profile: what the customer tells us about themselves."""

    customer = models.OneToOneField("customers.Customer", on_delete=models.CASCADE, related_name="profile")
    bio = models.TextField(blank=True)
    birth_date = models.DateField(null=True, blank=True)
    newsletter = models.BooleanField(default=False)
    preferences = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)
    # v2: added nullable (0002), backfilled from the customer (0003).
    display_name = models.CharField(max_length=200, null=True, blank=True)
    locale = models.CharField(max_length=16, null=True, blank=True)
    last_login_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "profiles"

    def __str__(self):
        return f"profile of customer {self.customer_id}"

    def as_dict(self):
        return {
            "bio": self.bio,
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "newsletter": self.newsletter,
            "preferences": self.preferences,
            "display_name": self.display_name,
            "locale": self.locale,
            "last_login_at": self.last_login_at.isoformat() if self.last_login_at else None,
        }
