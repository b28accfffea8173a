from django.db import migrations, models


class Migration(migrations.Migration):
    """Step 1 of 2: the new columns, nullable, so the old code keeps working."""

    dependencies = [
        ("profiles", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="profile",
            name="display_name",
            field=models.CharField(blank=True, max_length=200, null=True),
        ),
        migrations.AddField(
            model_name="profile",
            name="locale",
            field=models.CharField(blank=True, max_length=16, null=True),
        ),
        migrations.AddField(
            model_name="profile",
            name="last_login_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
