"""v2: the category normalization rules used by migration catalog.0003."""

from django.test import SimpleTestCase, TestCase

from catalog.models import Category, Product
from catalog.normalize import category_key, display_name, plan


class NormalizeTests(SimpleTestCase):
    def test_case_and_whitespace_variants_share_a_key(self):
        variants = ["Home & Garden", "home & garden", "HOME & GARDEN ", " Home  &  Garden", "Home\u00a0& Garden"]
        self.assertEqual({category_key(v) for v in variants}, {"home & garden"})
        self.assertEqual(display_name("home & garden"), "Home & Garden")

    def test_blank_strings_become_uncategorized(self):
        self.assertEqual(category_key("   "), "uncategorized")
        self.assertEqual(category_key(""), "uncategorized")

    def test_plan_is_order_independent_and_slugs_are_unique(self):
        raws = ["Toys & Games", "toys  & games", "Toys-Games", "Books", "BOOKS "]
        key_of, categories = plan(raws)
        self.assertEqual(plan(list(reversed(raws))), (key_of, categories))
        self.assertEqual(len(categories), 3)
        slugs = [slug for _name, slug in categories.values()]
        self.assertEqual(len(slugs), len(set(slugs)))
        self.assertEqual(categories["toys & games"], ("Toys & Games", "toys-games"))
        self.assertEqual(categories["toys-games"], ("Toys-games", "toys-games-2"))


class ProductCategoryTests(TestCase):
    def test_product_needs_a_category_row(self):
        kitchen = Category.objects.create(name="Kitchen", slug="kitchen")
        product = Product.objects.create(sku="K-1", name="Pan", price="12.00", category=kitchen)
        self.assertEqual(product.category_name, "Kitchen")
        self.assertEqual(list(kitchen.products.all()), [product])
