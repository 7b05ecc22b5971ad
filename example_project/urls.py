"""URLs of the example project: the admin at the root."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("reliable_tasks.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
