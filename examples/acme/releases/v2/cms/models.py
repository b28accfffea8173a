from django.db import models
from django.utils import timezone


class Tag(models.Model):
    """A content tag, shared by CMS pages and catalogue products (v2)."""

    name = models.CharField(max_length=64, unique=True)
    slug = models.SlugField(max_length=80, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "cms_tags"
        ordering = ["name"]

    def __str__(self):
        return self.name


class Page(models.Model):
    """A CMS page, rendered through cms/page.html."""

    slug = models.SlugField(max_length=120, unique=True)
    title = models.CharField(max_length=200)
    body = models.TextField()
    published = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)
    tags = models.ManyToManyField(Tag, blank=True, related_name="pages", db_table="cms_page_tags")

    class Meta:
        db_table = "cms_pages"
        ordering = ["slug"]

    def __str__(self):
        return self.title
