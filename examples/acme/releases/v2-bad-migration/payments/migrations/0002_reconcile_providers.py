"""DEFECTIVE ON PURPOSE (release v2-bad-migration): fails after committing part of its work.

The migration is non-atomic, so each batch UPDATE commits on its own. After the
first half of the payments had their provider code rewritten, it hits a provider
code it does not know and raises: `migrate` exits non-zero, the migration is not
recorded, and the database holds a half-applied data change that only a restore
(or a hand-written repair) undoes. This is the case the deploy's backup exists for.
"""

from django.db import migrations

BATCH = 5000


def reconcile(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT count(*), coalesce(min(id), 0) FROM payments")
        count, first_id = cursor.fetchone()
        cursor.execute("SELECT id FROM payments ORDER BY id OFFSET %s LIMIT 1", [count // 2])
        row = cursor.fetchone()
        half_id = row[0] if row else first_id
        low = first_id
        while low < half_id:
            high = min(low + BATCH, half_id)
            cursor.execute(
                "UPDATE payments SET provider = upper(provider) WHERE id >= %s AND id < %s",
                [low, high],
            )
            low = high
    raise RuntimeError(
        "payments.0002_reconcile_providers: unknown provider code 'LEGACY-POS' in payment batch; "
        "half of the payments were already rewritten (release v2-bad-migration)"
    )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("payments", "0001_initial"),
        ("catalog", "0005_product_tags"),
        ("profiles", "0003_backfill_profiles"),
        ("orders", "0002_order_customer_created_idx"),
    ]

    operations = [
        migrations.RunPython(reconcile, migrations.RunPython.noop),
    ]
