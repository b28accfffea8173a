"""v2: a login stamps the profile (last_login_at) and fills a missing display name."""

from django.contrib.auth import authenticate
from django.test import TestCase

from customers.legacy import make_legacy_hash
from customers.models import Customer
from profiles.models import Profile


class ProfileSyncTests(TestCase):
    def test_login_records_last_login_and_display_name(self):
        customer = Customer.objects.create(
            email="dora@example.com", first_name="Dora", last_name="Explorer", legacy_password=make_legacy_hash("pw-1", "s")
        )
        Profile.objects.create(customer=customer)
        self.assertIsNotNone(authenticate(None, username="dora@example.com", password="pw-1"))
        profile = Profile.objects.get(customer=customer)
        self.assertIsNotNone(profile.last_login_at)
        self.assertEqual(profile.display_name, "Dora Explorer")

    def test_login_creates_a_missing_profile_and_keeps_a_set_name(self):
        customer = Customer.objects.create(
            email="eve@example.com", first_name="Eve", last_name="Online", legacy_password=make_legacy_hash("pw-2", "t")
        )
        self.assertIsNotNone(authenticate(None, username="eve@example.com", password="pw-2"))
        Profile.objects.filter(customer=customer).update(display_name="Evie")
        self.assertIsNotNone(authenticate(None, username="eve@example.com", password="pw-2"))
        self.assertEqual(Profile.objects.get(customer=customer).display_name, "Evie")

    def test_failed_login_records_nothing(self):
        customer = Customer.objects.create(
            email="fay@example.com", first_name="Fay", last_name="Wray", legacy_password=make_legacy_hash("pw-3", "u")
        )
        Profile.objects.create(customer=customer)
        self.assertIsNone(authenticate(None, username="fay@example.com", password="wrong"))
        self.assertIsNone(Profile.objects.get(customer=customer).last_login_at)
