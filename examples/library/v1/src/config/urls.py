from django.contrib import admin
from django.urls import path

from shelf.views import BookList

urlpatterns = [
    path("", BookList.as_view(), name="books"),
    path("admin/", admin.site.urls),
]
