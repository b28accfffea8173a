from django.contrib import admin

from profiles.models import Profile


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    list_display = ("id", "customer", "newsletter", "updated_at")
    raw_id_fields = ("customer",)
