import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    """Normalized categories, step 3: drop the v1 string, the FK takes its name and becomes NOT NULL.

    Reversible: the reverse re-adds the string column (empty) and 0003's reverse refills it.
    """

    dependencies = [
        ("catalog", "0003_normalize_categories"),
    ]

    operations = [
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
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="products", to="catalog.category"
            ),
        ),
    ]
