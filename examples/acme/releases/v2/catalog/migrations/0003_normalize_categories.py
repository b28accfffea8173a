"""Normalized categories, step 2: load Category from the v1 strings and link every product.

Forward, in one transaction with products locked against writes (EXCLUSIVE: reads go on; a
weaker lock such as SHARE ROW EXCLUSIVE lets a live checkout hold a product FOR UPDATE, and
the two deadlock when the UPDATE below reaches that row while the checkout waits to write):
  1. count the products per distinct v1 string;
  2. map each string to a key (case/whitespace-insensitive, catalog.normalize) and
     create one Category per key;
  3. archive each product's v1 string (catalog_legacy_product_categories);
  4. link every product to its Category with one UPDATE ... FROM;
  5. validate: no product unlinked, products per category equal to the counts of
     step 1, one category per key, one archived string per product and equal to
     the v1 column. Any mismatch raises CategoryNormalizationError and the whole
     migration rolls back.
Reverse: 0004's reverse has already put the archived strings back (the column is
NOT NULL again by then) and 0002's reverse drops the new tables and the FK.
"""

from django.db import migrations

from catalog.normalize import plan


class CategoryNormalizationError(RuntimeError):
    """The data after normalization does not add up; nothing was committed."""


def _fetch(cursor, query, params=None):
    cursor.execute(query, params)
    return cursor.fetchall()


def normalize(apps, schema_editor):
    db = schema_editor.connection.alias
    category_model = apps.get_model("catalog", "Category")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("LOCK TABLE products IN EXCLUSIVE MODE")
        raw_counts = dict(_fetch(cursor, "SELECT category, count(*) FROM products GROUP BY category"))
        key_of, categories = plan(raw_counts)
        created = category_model.objects.using(db).bulk_create(
            [category_model(name=name, slug=slug) for key, (name, slug) in sorted(categories.items())]
        )
        id_of_name = dict(category_model.objects.using(db).values_list("name", "id"))
        id_of_key = {key: id_of_name[name] for key, (name, _slug) in categories.items()}
        expected = {}
        for raw, count in raw_counts.items():
            cid = id_of_key[key_of[raw]]
            expected[cid] = expected.get(cid, 0) + count
        total = sum(raw_counts.values())

        cursor.execute("CREATE TEMPORARY TABLE acme_category_map (raw text PRIMARY KEY, category_id bigint NOT NULL)")
        cursor.executemany(
            "INSERT INTO acme_category_map (raw, category_id) VALUES (%s, %s)",
            [(raw, id_of_key[key]) for raw, key in sorted(key_of.items())],
        )
        cursor.execute("INSERT INTO catalog_legacy_product_categories (product_id, raw_value) SELECT id, category FROM products")
        cursor.execute(
            "UPDATE products AS p SET category_ref_id = m.category_id FROM acme_category_map AS m WHERE m.raw = p.category"
        )
        cursor.execute("DROP TABLE acme_category_map")

        problems = []
        (unlinked,) = _fetch(cursor, "SELECT count(*) FROM products WHERE category_ref_id IS NULL")[0]
        if unlinked:
            problems.append(f"{unlinked} products have no category")
        actual = dict(
            _fetch(cursor, "SELECT category_ref_id, count(*) FROM products WHERE category_ref_id IS NOT NULL GROUP BY 1")
        )
        for cid in sorted(set(expected) | set(actual)):
            if expected.get(cid, 0) != actual.get(cid, 0):
                problems.append(f"category id {cid}: {actual.get(cid, 0)} products linked, {expected.get(cid, 0)} expected")
        (n_categories,) = _fetch(cursor, "SELECT count(*) FROM catalog_categories")[0]
        if n_categories != len(categories) or len(created) != len(categories):
            problems.append(f"{n_categories} categories stored, {len(categories)} distinct keys")
        (archived,) = _fetch(
            cursor,
            "SELECT count(*) FROM catalog_legacy_product_categories AS l"
            " JOIN products AS p ON p.id = l.product_id AND p.category = l.raw_value",
        )[0]
        (n_products,) = _fetch(cursor, "SELECT count(*) FROM products")[0]
        if n_products != total:
            problems.append(f"{n_products} products now, {total} when counted")
        if archived != total:
            problems.append(f"{archived} v1 category strings archived, {total} products")
        if problems:
            shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
            raise CategoryNormalizationError(f"category normalization does not add up, rolled back: {shown}")


class Migration(migrations.Migration):
    dependencies = [
        ("catalog", "0002_category"),
    ]

    operations = [
        # Reverse: nothing left to do here (see the module docstring).
        migrations.RunPython(normalize, migrations.RunPython.noop, elidable=False),
    ]
