from django.contrib import admin

from payments.models import Payment


@admin.register(Payment)
class PaymentAdmin(admin.ModelAdmin):
    list_display = ("id", "order", "amount", "status", "provider", "provider_reference")
    list_filter = ("status", "provider")
    raw_id_fields = ("order",)
