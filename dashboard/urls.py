from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard.views import auth, data, keys, members, overview, playground, queries

app_name = "dashboard"

urlpatterns = [
    path("", overview.overview, name="overview"),
    path("login/", auth.sign_in, name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("switch/", auth.switch, name="switch"),
    path("keys/", keys.key_list, name="keys"),
    path("keys/<int:key_id>/", keys.key_detail, name="key"),
    path("keys/<int:key_id>/revoke/", keys.key_revoke, name="key-revoke"),
    path("keys/<int:key_id>/delete-queries/", keys.key_delete_queries, name="key-delete-queries"),
    path("data/", data.data_settings, name="data"),
    path("data/export.jsonl", data.query_export, name="export"),
    path("queries/", queries.query_list, name="queries"),
    path("queries/<uuid:query_id>/", queries.query_detail, name="query"),
    # The query's first image (the URL of one-image days), and each by its position.
    path("queries/<uuid:query_id>/image.png", queries.query_image, name="query-image"),
    path("queries/<uuid:query_id>/image/<int:position>", queries.query_image, name="query-image-at"),
    path("playground/", playground.playground, name="playground"),
    path("members/", members.member_list, name="members"),
    path("members/invitations/", members.invitation_create, name="invitation-create"),
    path("members/invitations/<int:invitation_id>/revoke/", members.invitation_revoke, name="invitation-revoke"),
    path("members/<int:member_id>/role/", members.member_role, name="member-role"),
    path("members/<int:member_id>/remove/", members.member_remove, name="member-remove"),
    # The link an invitee opens: no sign-in needed (the token is the credential).
    path("invite/<str:token>/", members.invitation, name="invitation"),
]
