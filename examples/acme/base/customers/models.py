from django.conf import settings
from django.db import models
from django.utils import timezone


class Customer(models.Model):
    """A shop customer. Logs in by e-mail (see customers.backends)."""

    email = models.EmailField(max_length=254, unique=True)
    first_name = models.CharField(max_length=100)
    last_name = models.CharField(max_length=100)
    phone = models.CharField(max_length=32, blank=True)
    street = models.CharField(max_length=200, blank=True)
    city = models.CharField(max_length=100, blank=True)
    postal_code = models.CharField(max_length=16, blank=True)
    country = models.CharField(max_length=2, default="GB")
    # Password hash imported from the pre-Django shop: "sha1$<salt>$<hex digest>".
    # Emptied once the customer has logged in and the hash was upgraded.
    legacy_password = models.CharField(max_length=128, blank=True)
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="customer"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "customers"
        ordering = ["id"]

    def __str__(self):
        return f"{self.first_name} {self.last_name} <{self.email}>"

    @property
    def full_name(self):
        return (f"{self.first_name} {self.last_name}").strip()
