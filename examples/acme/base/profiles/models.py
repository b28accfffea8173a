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
        }
