from django.contrib import admin

from cms.models import Page, Tag


@admin.register(Tag)
class TagAdmin(admin.ModelAdmin):
    list_display = ("name", "slug")
    prepopulated_fields = {"slug": ("name",)}


@admin.register(Page)
class PageAdmin(admin.ModelAdmin):
    list_display = ("slug", "title", "published", "updated_at")
    prepopulated_fields = {"slug": ("title",)}
    filter_horizontal = ("tags",)
