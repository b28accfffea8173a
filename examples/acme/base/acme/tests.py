"""Tests of /healthz and the smoke endpoints (run by `manage.py test` on every release)."""

import json
from decimal import Decimal

from django.conf import settings
from django.test import TestCase, override_settings

from catalog.models import Product
from cms.models import Page
from customers.models import Customer
from orders.models import Order
from payments.models import Payment
from profiles.models import Profile


def make_product(sku, inventory, price="10.00", **extra):
    fields = {"sku": sku, "name": "Thing " + sku, "price": Decimal(price), "inventory": inventory}
    fields.update(extra)
    if "category" not in fields:
        fields["category"] = make_category()
    return Product.objects.create(**fields)


def make_category():
    """v1: a string; v2: a Category row. The test suite runs on both."""
    field = Product._meta.get_field("category")
    if field.is_relation:
        return field.related_model.objects.get_or_create(name="Kitchen", defaults={"slug": "kitchen"})[0]
    return "Kitchen"


@override_settings(SECURE_SSL_REDIRECT=False)  # the load balancer speaks plain HTTP to the app
class PlainHTTPTestCase(TestCase):
    pass


class HealthzTests(PlainHTTPTestCase):
    def test_ok_with_release_versions_and_migration_count(self):
        response = self.client.get("/healthz")
        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(body["status"], "ok")
        self.assertIs(body["database"], True)
        self.assertEqual(body["unapplied_migrations"], 0)
        self.assertEqual(body["release"], settings.RELEASE_ID)
        self.assertRegex(body["django"], r"^\d+\.\d+")
        self.assertRegex(body["python"], r"^3\.\d+")
        self.assertEqual(body["checks"]["templates"], "ok")

    def test_reachable_over_plain_http_even_with_ssl_redirect_on(self):
        with override_settings(SECURE_SSL_REDIRECT=True):
            self.assertEqual(self.client.get("/healthz").status_code, 200)
            self.assertEqual(self.client.get("/smoke/profile/1").status_code, 301)

    def test_broken_dependency_answers_503(self):
        with override_settings(TEMPLATES=[{**settings.TEMPLATES[0], "APP_DIRS": False}]):
            response = self.client.get("/healthz")
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.json()["status"], "fail")
        self.assertIn("TemplateDoesNotExist", response.json()["checks"]["templates"])


class ProfileSmokeTests(PlainHTTPTestCase):
    def test_profile_of_existing_customer(self):
        customer = Customer.objects.create(email="ada@example.com", first_name="Ada", last_name="Lovelace")
        Profile.objects.create(customer=customer, bio="Analyst", preferences={"theme": "dark"})
        response = self.client.get(f"/smoke/profile/{customer.pk}")
        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(body["email"], "ada@example.com")
        self.assertEqual(body["name"], "Ada Lovelace")
        self.assertEqual(body["profile"]["preferences"], {"theme": "dark"})

    def test_unknown_customer_is_404(self):
        self.assertEqual(self.client.get("/smoke/profile/999999").status_code, 404)


class PageTests(PlainHTTPTestCase):
    def test_published_page_renders_body(self):
        Page.objects.create(slug="about", title="About ACME", body="We sell things.\n\nMany things.")
        response = self.client.get("/pages/about")
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, "<h1>About ACME</h1>")
        self.assertContains(response, "<p>Many things.</p>")
        self.assertContains(response, "release " + settings.RELEASE_ID)

    def test_unpublished_page_is_404(self):
        Page.objects.create(slug="draft", title="Draft", body="x", published=False)
        self.assertEqual(self.client.get("/pages/draft").status_code, 404)


class CheckoutSmokeTests(PlainHTTPTestCase):
    def setUp(self):
        self.customer = Customer.objects.create(email="bob@example.com", first_name="Bob", last_name="Builder")
        self.cheap = make_product("A-1", inventory=5, price="2.50")
        self.dear = make_product("B-2", inventory=1, price="99.99")

    def post(self, payload, query=""):
        return self.client.post("/smoke/checkout" + query, data=json.dumps(payload), content_type="application/json")

    def test_creates_order_items_payment_and_decrements_inventory(self):
        response = self.post(
            {
                "customer_id": self.customer.pk,
                "items": [{"product_id": self.cheap.pk, "quantity": 2}, {"product_id": self.dear.pk, "quantity": 1}],
            }
        )
        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        order = Order.objects.get(pk=body["order_id"])
        self.assertEqual(order.total, Decimal("104.99"))
        self.assertEqual(order.items.count(), 2)
        payment = Payment.objects.get(pk=body["payment_id"])
        self.assertEqual((payment.order_id, payment.amount), (order.pk, Decimal("104.99")))
        self.cheap.refresh_from_db()
        self.dear.refresh_from_db()
        self.assertEqual((self.cheap.inventory, self.dear.inventory), (3, 0))
        self.assertEqual(body["inventory_after"], {str(self.cheap.pk): 3, str(self.dear.pk): 0})

    def test_out_of_stock_creates_nothing(self):
        response = self.post(
            {
                "customer_id": self.customer.pk,
                "items": [{"product_id": self.cheap.pk, "quantity": 1}, {"product_id": self.dear.pk, "quantity": 2}],
            }
        )
        self.assertEqual(response.status_code, 409)
        self.assertEqual((Order.objects.count(), Payment.objects.count()), (0, 0))
        self.cheap.refresh_from_db()
        self.assertEqual(self.cheap.inventory, 5)

    def test_empty_body_buys_one_of_the_best_stocked_product(self):
        response = self.client.post("/smoke/checkout")
        self.assertEqual(response.status_code, 201, response.content)
        self.assertEqual(response.json()["inventory_after"], {str(self.cheap.pk): 4})

    def test_dry_run_rolls_everything_back(self):
        response = self.post({}, query="?dry_run=1")
        self.assertEqual(response.status_code, 200)
        self.assertTrue(response.json()["dry_run"])
        self.assertEqual((Order.objects.count(), Payment.objects.count()), (0, 0))
        self.cheap.refresh_from_db()
        self.assertEqual(self.cheap.inventory, 5)

    def test_bad_json_is_400(self):
        response = self.client.post("/smoke/checkout", data="{nope", content_type="application/json")
        self.assertEqual(response.status_code, 400)

    def test_checkout_is_the_only_csrf_exempt_post(self):
        client = self.client_class(enforce_csrf_checks=True)
        self.assertEqual(client.post("/smoke/checkout?dry_run=1").status_code, 200)
        self.assertEqual(client.post("/admin/login/", {"username": "x", "password": "y"}).status_code, 403)
