from django.db import models
from taggit.managers import TaggableManager


class Author(models.Model):
    name = models.CharField(max_length=200)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=300)
    author = models.ForeignKey(Author, on_delete=models.PROTECT, related_name="books")
    published = models.DateField(null=True, blank=True)
    tags = TaggableManager(blank=True)

    class Meta:
        ordering = ["title"]

    def __str__(self) -> str:
        return self.title
