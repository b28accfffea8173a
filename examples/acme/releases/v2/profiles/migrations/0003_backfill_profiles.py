"""Step 2 of 2: backfill display_name and locale from the customer, server-side.

One UPDATE ... FROM; it then checks that no profile was left without a display
name and raises (rolling the migration back) if one was.
"""

from django.db import migrations

# Country -> locale; anything else gets plain "en".
LOCALES = {
    "GB": "en-GB",
    "IE": "en-IE",
    "US": "en-US",
    "DE": "de-DE",
    "AT": "de-AT",
    "FR": "fr-FR",
    "ES": "es-ES",
    "IT": "it-IT",
    "NL": "nl-NL",
    "PL": "pl-PL",
}


def backfill(apps, schema_editor):
    cases = " ".join(f"WHEN '{country}' THEN '{locale}'" for country, locale in sorted(LOCALES.items()))
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "UPDATE profiles AS p"
            " SET display_name = left(btrim(c.first_name || ' ' || c.last_name), 200),"
            f"     locale = CASE c.country {cases} ELSE 'en' END"
            " FROM customers AS c"
            " WHERE c.id = p.customer_id AND (p.display_name IS NULL OR p.locale IS NULL)"
        )
        cursor.execute("SELECT count(*) FROM profiles WHERE display_name IS NULL OR locale IS NULL")
        (missing,) = cursor.fetchone()
    if missing:
        raise RuntimeError(f"profile backfill incomplete: {missing} profiles still have no display_name/locale")


def unbackfill(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("UPDATE profiles SET display_name = NULL, locale = NULL, last_login_at = NULL")


class Migration(migrations.Migration):
    dependencies = [
        ("profiles", "0002_profile_display_name_locale_last_login"),
        ("customers", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(backfill, unbackfill, elidable=False),
    ]
