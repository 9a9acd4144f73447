from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import views
from inference import views as inference_views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("login/", views.sign_in, name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("switch/", views.switch, name="switch"),
    path("keys/", views.key_list, name="keys"),
    path("keys/<int:key_id>/", views.key_detail, name="key"),
    path("keys/<int:key_id>/revoke/", views.key_revoke, name="key-revoke"),
    path("keys/<int:key_id>/delete-queries/", views.key_delete_queries, name="key-delete-queries"),
    path("data/", views.data_settings, name="data"),
    path("data/export.jsonl", inference_views.query_export, name="export"),
    path("queries/", inference_views.query_list, name="queries"),
    path("queries/<uuid:query_id>/", inference_views.query_detail, name="query"),
    # The query's first image (the URL of one-image days), and each by its position.
    path("queries/<uuid:query_id>/image.png", inference_views.query_image, name="query-image"),
    path("queries/<uuid:query_id>/image/<int:position>", inference_views.query_image, name="query-image-at"),
    path("playground/", inference_views.playground, name="playground"),
]
