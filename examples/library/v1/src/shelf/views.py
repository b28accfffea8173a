from django.views.generic import ListView

from .models import Book


class BookList(ListView):
    queryset = Book.objects.select_related("author")
    paginate_by = 50
