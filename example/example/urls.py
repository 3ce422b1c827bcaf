"""The example's pages: the admin, and Conveyor's dashboard at /conveyor/."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("conveyor/", include("conveyor.dashboard.urls")),
]
