from django.urls import path

from inference import api

urlpatterns = [
    path("v1/glm/infer", api.GlmInferView.as_view(), name="glm-infer"),
    path("health", api.HealthView.as_view(), name="health"),
]
