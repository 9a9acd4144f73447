from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView

from dashboard.views import admin as admin_views
from dashboard.views.auth import limit_sign_in
from inference import views as inference_views

admin.site.site_header = "Sightline admin"
admin.site.site_title = "Sightline"
admin.site.index_title = "Tenants, keys and the query log"
admin.site.enable_nav_sidebar = False  # the query list needs the width

urlpatterns = [
    path("", include("inference.urls")),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi"),
    path("docs", SpectacularSwaggerView.as_view(url_name="openapi"), name="docs"),
    path("metrics", inference_views.metrics, name="metrics"),
    path("admin/usage/", admin_views.admin_usage, name="admin-usage"),
    path("admin/spend/", admin_views.admin_spend, name="admin-spend"),
    path("admin/spend/spend.csv", admin_views.admin_spend_csv, name="admin-spend-csv"),
    # The query's first image (the URL of one-image days), and each by its position.
    path("admin/queries/<uuid:query_id>/image.png", admin_views.admin_query_image, name="admin-query-image"),
    path(
        "admin/queries/<uuid:query_id>/image/<int:position>",
        admin_views.admin_query_image,
        name="admin-query-image-at",
    ),
    path("admin/login/", limit_sign_in(admin.site.login)),  # before admin.site.urls: the same sign-in limit
    path("admin/", admin.site.urls),
    path("dashboard/", include("dashboard.urls")),
]

# Errors raised outside DRF's views (unknown paths, a refused Host header) are JSON under /v1/.
handler400 = "config.errors.bad_request"
handler403 = "config.errors.permission_denied"
handler404 = "config.errors.page_not_found"
handler500 = "config.errors.server_error"
