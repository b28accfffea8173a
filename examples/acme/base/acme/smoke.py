"""Smoke endpoints: the proposal's test cases, reachable over HTTP.

* GET  /smoke/profile/<customer_id>  profile access
* POST /smoke/checkout               order + payment in one transaction
"""

import json
import uuid
from decimal import Decimal

from django.db import transaction
from django.db.models import F
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from catalog.models import Product
from customers.models import Customer
from orders.models import Order, OrderItem
from payments.models import Payment
from profiles.models import Profile


class CheckoutError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@require_GET
def profile(request, customer_id):
    customer = Customer.objects.filter(pk=customer_id).first()
    if customer is None:
        return JsonResponse({"error": "no such customer", "customer_id": customer_id}, status=404)
    profile = Profile.objects.filter(customer=customer).first()
    return JsonResponse(
        {
            "customer_id": customer.pk,
            "email": customer.email,
            "name": customer.full_name,
            "country": customer.country,
            "profile": profile.as_dict() if profile else None,
        }
    )


def _parse_checkout(request):
    """JSON body (application/json), or form fields customer_id/provider, or nothing at all."""
    if request.content_type != "application/json":
        return {key: request.POST[key] for key in ("customer_id", "provider") if request.POST.get(key)}
    if not request.body:
        return {}
    try:
        data = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckoutError(400, "body must be JSON") from None
    if not isinstance(data, dict):
        raise CheckoutError(400, "body must be a JSON object")
    return data


def _items(data):
    """[(product_id, quantity)] from the request, or one unit of the best-stocked product."""
    raw = data.get("items")
    if raw is None:
        product = Product.objects.filter(inventory__gt=0).order_by("-inventory", "id").first()
        if product is None:
            raise CheckoutError(409, "no product in stock")
        return [(product.pk, 1)]
    if not isinstance(raw, list) or not raw:
        raise CheckoutError(400, "items must be a non-empty list")
    items = {}
    for item in raw:
        try:
            product_id, quantity = int(item["product_id"]), int(item.get("quantity", 1))
        except (KeyError, TypeError, ValueError):
            raise CheckoutError(400, "each item needs an integer product_id and quantity") from None
        if quantity < 1:
            raise CheckoutError(400, "quantity must be >= 1")
        items[product_id] = items.get(product_id, 0) + quantity
    return sorted(items.items())


def _checkout(data):
    customer_id = data.get("customer_id")
    if customer_id is not None:
        try:
            customer_id = int(customer_id)
        except (TypeError, ValueError):
            raise CheckoutError(400, "customer_id must be an integer") from None
    customer = (
        Customer.objects.filter(pk=customer_id).first() if customer_id is not None else Customer.objects.order_by("id").first()
    )
    if customer is None:
        raise CheckoutError(404, "no such customer")
    wanted = _items(data)
    # Lock the product rows in id order (no deadlock between two checkouts).
    products = {p.pk: p for p in Product.objects.select_for_update().filter(pk__in=[pid for pid, _ in wanted]).order_by("id")}
    lines = []
    for product_id, quantity in wanted:
        product = products.get(product_id)
        if product is None:
            raise CheckoutError(404, f"no such product: {product_id}")
        if product.inventory < quantity:
            raise CheckoutError(409, f"not enough stock for product {product_id}")
        lines.append((product, quantity))
    total = sum((p.price * q for p, q in lines), Decimal("0.00"))
    now = timezone.now()
    order = Order.objects.create(
        customer=customer,
        status=Order.Status.PAID,
        currency="GBP",
        total=total,
        shipping_address="\n".join(x for x in (customer.street, customer.postal_code + " " + customer.city) if x.strip()),
        notes="smoke checkout",
        created_at=now,
        updated_at=now,
    )
    for product, quantity in lines:
        OrderItem.objects.create(order=order, product=product, quantity=quantity, unit_price=product.price)
        Product.objects.filter(pk=product.pk).update(inventory=F("inventory") - quantity)
    payment = Payment.objects.create(
        order=order,
        amount=total,
        currency="GBP",
        status=Payment.Status.AUTHORIZED,
        provider=str(data.get("provider") or "smoke"),
        provider_reference="smoke-" + uuid.uuid4().hex,
        details={"source": "smoke-checkout", "lines": len(lines)},
        created_at=now,
    )
    return order, payment


@csrf_exempt
@require_POST
def checkout(request):
    """Create an order and its payment atomically; ?dry_run=1 rolls it all back."""
    dry_run = request.GET.get("dry_run") in ("1", "true", "yes")
    try:
        data = _parse_checkout(request)
        with transaction.atomic():
            order, payment = _checkout(data)
            remaining = {
                p["id"]: p["inventory"] for p in Product.objects.filter(order_items__order=order).values("id", "inventory")
            }
            if dry_run:
                transaction.set_rollback(True)
    except CheckoutError as exc:
        return JsonResponse({"error": str(exc)}, status=exc.status)
    return JsonResponse(
        {
            "order_id": order.pk,
            "payment_id": payment.pk,
            "customer_id": order.customer_id,
            "total": str(order.total),
            "status": order.status,
            "payment_status": payment.status,
            "inventory_after": {str(k): v for k, v in sorted(remaining.items())},
            "dry_run": dry_run,
        },
        status=200 if dry_run else 201,
    )
