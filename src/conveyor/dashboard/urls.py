"""``include("conveyor.dashboard.urls")``: the dashboard's pages and its buttons."""

from django.urls import path

from conveyor import metrics
from conveyor.dashboard import views

app_name = "conveyor_dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("live/", views.live, name="live"),
    path("metrics/", metrics.view, name="metrics"),
    path("workers/", views.workers, name="workers"),
    path("schedules/", views.schedules, name="schedules"),
    path("jobs/<str:job_id>/retry/", views.retry, name="retry"),
    path("jobs/<str:job_id>/cancel/", views.cancel, name="cancel"),
    path("schedules/<str:verb>/<path:name>", views.schedule_action, name="schedule-action"),
    path("queues/<str:verb>/<path:name>", views.queue_action, name="queue-action"),
]
