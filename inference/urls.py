from django.urls import path

from inference import api

urlpatterns = [
    path("v1/glm/infer", api.GlmInferView.as_view(), name="glm-infer"),
    path("v1/queries", api.QueryListView.as_view(), name="query-list"),
    path("v1/queries/<str:query_id>", api.QueryDetailView.as_view(), name="query-detail"),
    path("health", api.HealthView.as_view(), name="health"),
    path("health/ready", api.ReadyView.as_view(), name="health-ready"),
]
