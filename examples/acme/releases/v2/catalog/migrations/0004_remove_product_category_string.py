"""Normalized categories, step 3: drop the v1 string; the FK takes its name and becomes NOT NULL.

Reverse, bottom-up: the FK becomes nullable and is renamed back to category_ref,
the string column comes back (nullable), the archived v1 strings are written into
it (restore_category_strings), and only then it becomes NOT NULL again, as in v1.
"""

import django.db.models.deletion
from django.db import migrations, models


def restore_category_strings(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("LOCK TABLE products IN EXCLUSIVE MODE")  # as 0003: no FOR UPDATE holder inside
        cursor.execute(
            "UPDATE products AS p SET category = l.raw_value"
            " FROM catalog_legacy_product_categories AS l WHERE l.product_id = p.id"
        )
        # Products created under v2 have no archived string: they get their category's name.
        cursor.execute(
            "UPDATE products AS p SET category = c.name FROM catalog_categories AS c"
            " WHERE c.id = p.category_ref_id AND p.category IS NULL"
        )
        cursor.execute("SELECT count(*) FROM products WHERE category IS NULL")
        (missing,) = cursor.fetchone()
    if missing:
        raise RuntimeError(
            f"cannot restore the v1 category strings: {missing} products have neither an archived string nor a category"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0003_normalize_categories"),
    ]

    operations = [
        migrations.AlterField(
            model_name="product",
            name="category",
            field=models.CharField(max_length=100, null=True),
        ),
        migrations.RunPython(migrations.RunPython.noop, restore_category_strings, elidable=False),
        migrations.RemoveField(
            model_name="product",
            name="category",
        ),
        migrations.RenameField(
            model_name="product",
            old_name="category_ref",
            new_name="category",
        ),
        migrations.AlterField(
            model_name="product",
            name="category",
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name="products", to="catalog.category"),
        ),
    ]
