from django.urls import path

from inference.consumers import InferConsumer

websocket_urlpatterns = [
    path("ws/v1/infer", InferConsumer.as_asgi()),
]
