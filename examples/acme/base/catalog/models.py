from django.db import models
from django.utils import timezone


class Product(models.Model):
    """A catalogue product. In v1 the category is free text typed by staff."""

    sku = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    category = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    inventory = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "products"
        ordering = ["id"]

    def __str__(self):
        return f"{self.sku} {self.name}"

    @property
    def category_name(self):
        return self.category
