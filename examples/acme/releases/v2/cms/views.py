from django.shortcuts import get_object_or_404, render

from cms.models import Page


def page_detail(request, slug):
    page = get_object_or_404(Page, slug=slug, published=True)
    return render(request, "cms/page.html", {"page": page, "tags": list(page.tags.all())})
