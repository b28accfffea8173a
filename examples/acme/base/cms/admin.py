from django.contrib import admin

from cms.models import Page


@admin.register(Page)
class PageAdmin(admin.ModelAdmin):
    list_display = ("slug", "title", "published", "updated_at")
    prepopulated_fields = {"slug": ("title",)}
