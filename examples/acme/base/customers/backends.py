"""Customer authentication: e-mail + password, with legacy hash upgrade.

Customers imported from the legacy shop carry a salted SHA-1 hash in
``Customer.legacy_password`` and no Django user. On their first successful
login the backend creates (or reuses) the linked ``auth.User``, stores the
password with Django's current hasher and erases the legacy hash, all in one
transaction. Later logins check the Django hash only.
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import BaseBackend
from django.contrib.auth.hashers import make_password
from django.db import transaction

from customers import profile_sync
from customers.legacy import verify_legacy_hash
from customers.models import Customer


def normalize_email(value):
    return (value or "").strip().lower()


class CustomerEmailBackend(BaseBackend):
    def authenticate(self, request, username=None, password=None, email=None, **kwargs):
        address = normalize_email(email or username)
        if not address or password is None:
            return None
        customer = Customer.objects.select_related("user").filter(email=address).first()
        if customer is None:
            make_password(password)  # same cost as a real check: no account enumeration by timing
            return None
        user = customer.user
        if user is not None and user.has_usable_password():
            if user.check_password(password) and self.user_can_authenticate(user):
                return self.after_login(customer, user)
            return None
        if customer.legacy_password and verify_legacy_hash(password, customer.legacy_password):
            user = self.upgrade(customer, password)
            if self.user_can_authenticate(user):
                return self.after_login(customer, user)
        return None

    @staticmethod
    def user_can_authenticate(user):
        return getattr(user, "is_active", True)

    def upgrade(self, customer, password):
        """Move a customer from the legacy hash to a Django user, atomically."""
        user_model = get_user_model()
        with transaction.atomic():
            locked = Customer.objects.select_for_update().get(pk=customer.pk)
            user = locked.user
            if user is None:
                user = user_model(
                    username=f"customer-{locked.pk}",
                    email=locked.email,
                    first_name=locked.first_name[:150],
                    last_name=locked.last_name[:150],
                )
            user.set_password(password)
            user.save()
            locked.user = user
            locked.legacy_password = ""
            locked.save(update_fields=["user", "legacy_password"])
        customer.user = user
        customer.legacy_password = ""
        return user

    def after_login(self, customer, user):
        """Release-specific bookkeeping (customers.profile_sync), then the user."""
        profile_sync.after_login(customer, user)
        return user

    def get_user(self, user_id):
        user = get_user_model().objects.filter(pk=user_id).first()
        if user is not None and self.user_can_authenticate(user):
            return user
        return None
