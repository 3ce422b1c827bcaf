"""The test project's URLs: the admin (tests/admin/) and the dashboard (tests/dashboard/)."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("conveyor/", include("conveyor.dashboard.urls")),
]
