from django.db import migrations, models


class Migration(migrations.Migration):
    """Content tagging: products carry cms.Tag tags."""

    dependencies = [
        ("catalog", "0004_remove_product_category_string"),
        ("cms", "0002_tag"),
    ]

    operations = [
        migrations.AddField(
            model_name="product",
            name="tags",
            field=models.ManyToManyField(blank=True, db_table="product_tags", related_name="products", to="cms.tag"),
        ),
    ]
