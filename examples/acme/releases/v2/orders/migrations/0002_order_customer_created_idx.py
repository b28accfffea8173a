from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    """Index for "a customer's orders, newest first", built without locking writes.

    CREATE INDEX CONCURRENTLY cannot run inside a transaction, hence atomic = False.
    If it is interrupted it leaves an INVALID index; re-running the migration after
    `DROP INDEX CONCURRENTLY orders_customer_created_idx` repairs it.
    """

    atomic = False

    dependencies = [
        ("orders", "0001_initial"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="order",
            index=models.Index(fields=["customer", "created_at"], name="orders_customer_created_idx"),
        ),
    ]
