import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    """Normalized categories, step 1: the Category table, the archive of v1 strings, a nullable FK."""

    dependencies = [
        ("catalog", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Category",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("slug", models.SlugField(max_length=120, unique=True)),
            ],
            options={
                "db_table": "catalog_categories",
                "ordering": ["name"],
                "verbose_name_plural": "categories",
            },
        ),
        migrations.CreateModel(
            name="LegacyProductCategory",
            fields=[
                (
                    "product",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="+",
                        serialize=False,
                        to="catalog.product",
                    ),
                ),
                ("raw_value", models.CharField(max_length=100)),
            ],
            options={
                "db_table": "catalog_legacy_product_categories",
            },
        ),
        migrations.AddField(
            model_name="product",
            name="category_ref",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="+", to="catalog.category"
            ),
        ),
    ]
