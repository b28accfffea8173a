"""The custom authentication backend: e-mail login, legacy hash upgrade."""

from django.contrib.auth import authenticate, get_user_model
from django.test import TestCase

from customers.legacy import make_legacy_hash, verify_legacy_hash
from customers.models import Customer


class LegacyHashTests(TestCase):
    def test_roundtrip_and_rejections(self):
        encoded = make_legacy_hash("s3cret", "abcd")
        self.assertTrue(encoded.startswith("sha1$abcd$"))
        self.assertTrue(verify_legacy_hash("s3cret", encoded))
        self.assertFalse(verify_legacy_hash("S3cret", encoded))
        self.assertFalse(verify_legacy_hash("s3cret", "md5$abcd$" + encoded.rsplit("$", 1)[1]))
        self.assertFalse(verify_legacy_hash("s3cret", "garbage"))


class CustomerEmailBackendTests(TestCase):
    def setUp(self):
        self.customer = Customer.objects.create(
            email="carol@example.com",
            first_name="Carol",
            last_name="Danvers",
            legacy_password=make_legacy_hash("old-password", "5a1t"),
        )

    def test_legacy_login_upgrades_the_hash_once(self):
        user = authenticate(None, username="  Carol@Example.COM ", password="old-password")
        self.assertIsNotNone(user)
        self.customer.refresh_from_db()
        self.assertEqual(self.customer.user_id, user.pk)
        self.assertEqual(self.customer.legacy_password, "")
        self.assertTrue(user.password.startswith("pbkdf2_sha256$"))
        self.assertTrue(user.check_password("old-password"))
        # Second login goes through the Django hash; no second user appears.
        again = authenticate(None, email="carol@example.com", password="old-password")
        self.assertEqual(again.pk, user.pk)
        self.assertEqual(get_user_model().objects.count(), 1)

    def test_wrong_password_changes_nothing(self):
        self.assertIsNone(authenticate(None, username="carol@example.com", password="nope"))
        self.customer.refresh_from_db()
        self.assertIsNone(self.customer.user_id)
        self.assertTrue(self.customer.legacy_password.startswith("sha1$"))

    def test_unknown_email_and_missing_password(self):
        self.assertIsNone(authenticate(None, username="nobody@example.com", password="old-password"))
        self.assertIsNone(authenticate(None, username="carol@example.com", password=None))

    def test_inactive_user_cannot_log_in(self):
        authenticate(None, username="carol@example.com", password="old-password")
        self.customer.refresh_from_db()
        self.customer.user.is_active = False
        self.customer.user.save()
        self.assertIsNone(authenticate(None, username="carol@example.com", password="old-password"))

    def test_session_login_through_the_test_client(self):
        self.assertTrue(self.client.login(username="carol@example.com", password="old-password"))
        self.assertEqual(int(self.client.session["_auth_user_id"]), Customer.objects.get().user_id)
