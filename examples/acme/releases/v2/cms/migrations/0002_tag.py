import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    """Content tagging: the Tag table and the page <-> tag link table."""

    dependencies = [
        ("cms", "0001_initial"),
    ]

    operations = [
        migrations.CreateModel(
            name="Tag",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=64, unique=True)),
                ("slug", models.SlugField(max_length=80, unique=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "db_table": "cms_tags",
                "ordering": ["name"],
            },
        ),
        migrations.AddField(
            model_name="page",
            name="tags",
            field=models.ManyToManyField(blank=True, db_table="cms_page_tags", related_name="pages", to="cms.tag"),
        ),
    ]
