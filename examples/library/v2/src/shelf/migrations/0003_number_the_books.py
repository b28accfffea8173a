"""Data migration: give every book already on the shelf a library number in isbn (reversible)."""

from django.db import migrations


def number_the_books(apps, schema_editor):
    Book = apps.get_model("shelf", "Book")
    for book in Book.objects.filter(isbn__isnull=True).only("id"):
        Book.objects.filter(pk=book.pk).update(isbn=f"LIB-{book.pk:06d}")


def forget_the_numbers(apps, schema_editor):
    apps.get_model("shelf", "Book").objects.filter(isbn__startswith="LIB-").update(isbn=None)


class Migration(migrations.Migration):
    dependencies = [("shelf", "0002_book_isbn_loan")]
    operations = [migrations.RunPython(number_the_books, forget_the_numbers)]
