from django.urls import path

from inference import api, openai_api, responses_api

urlpatterns = [
    path("v1/glm/infer", api.GlmInferView.as_view(), name="glm-infer"),
    path("v1/queries", api.QueryListView.as_view(), name="query-list"),
    path("v1/queries/<str:query_id>", api.QueryDetailView.as_view(), name="query-detail"),
    path("v1/queries/<str:query_id>/cancel", api.QueryCancelView.as_view(), name="query-cancel"),
    path("v1/chat/completions", openai_api.ChatCompletionsView.as_view(), name="chat-completions"),
    path("v1/responses", responses_api.ResponsesView.as_view(), name="responses"),
    path("v1/models", openai_api.ModelsView.as_view(), name="models"),
    # <path:>: model ids may hold a slash (org/name), and the SDK sends them unescaped.
    path("v1/models/<path:model_id>", openai_api.ModelDetailView.as_view(), name="model-detail"),
    path("v1/usage", api.UsageView.as_view(), name="usage"),
    path("health", api.HealthView.as_view(), name="health"),
    path("health/ready", api.ReadyView.as_view(), name="health-ready"),
]
