from django.db import models
from django.utils import timezone


class Category(models.Model):
    """A product category. v2 replaces v1's free-text Product.category with this."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=120, unique=True)

    class Meta:
        db_table = "catalog_categories"
        ordering = ["name"]
        verbose_name_plural = "categories"

    def __str__(self):
        return self.name


class LegacyProductCategory(models.Model):
    """The v1 category string of each product, kept so that 0003 can be reversed exactly.

    Written by catalog.0003 (forward), read by its reverse. Nothing else uses it;
    it can be dropped once v1 is out of the rollback window.
    """

    product = models.OneToOneField("catalog.Product", primary_key=True, on_delete=models.CASCADE, related_name="+")
    raw_value = models.CharField(max_length=100)

    class Meta:
        db_table = "catalog_legacy_product_categories"


class Product(models.Model):
    """A catalogue product."""

    sku = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    category = models.ForeignKey(Category, on_delete=models.PROTECT, related_name="products")
    price = models.DecimalField(max_digits=10, decimal_places=2)
    inventory = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    tags = models.ManyToManyField("cms.Tag", blank=True, related_name="products", db_table="product_tags")

    class Meta:
        db_table = "products"
        ordering = ["id"]

    def __str__(self):
        return f"{self.sku} {self.name}"

    @property
    def category_name(self):
        return self.category.name
