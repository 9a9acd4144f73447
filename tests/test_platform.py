"""The service around the API: health, OpenAPI docs, CORS, and what the web tier imports."""

import json
import subprocess
import sys

import pytest
from openapi_spec_validator import validate

from tests.conftest import REPO

pytestmark = pytest.mark.django_db


def test_health(api_client):
    response = api_client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert isinstance(body["model_loaded"], bool)
    assert body["mode"] == "embedded"


def test_openapi_schema_validates_and_documents_both_infer_forms(api_client):
    response = api_client.get("/openapi.json")
    assert response.status_code == 200
    schema = json.loads(response.content)
    validate(schema)
    infer = schema["paths"]["/v1/glm/infer"]["post"]
    content = infer["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert {"200", "400", "401", "413"} <= set(infer["responses"])


def test_swagger_ui_is_served(api_client):
    response = api_client.get("/docs")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_cors_applies_to_v1_only(api_client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    preflight = {
        "HTTP_ORIGIN": "https://app.example.com",
        "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "POST",
        "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "authorization,content-type",
    }
    response = api_client.options("/v1/glm/infer", **preflight)
    assert response["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "authorization" in response["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Origin" not in api_client.get("/health", HTTP_ORIGIN="https://app.example.com")
    other = api_client.options("/v1/glm/infer", **{**preflight, "HTTP_ORIGIN": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_settings_and_web_modules_do_not_import_torch():
    code = (
        "import os, sys; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings');"
        "import config.settings; assert 'torch' not in sys.modules, 'settings imported torch';"
        "import django; django.setup();"
        "import config.urls, inference.api, inference.services, accounts.services, inference.engine;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad; print('ok')"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_stdlib_platform_is_not_shadowed():
    result = _run_python("import platform; print(platform.system())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Linux"
    assert not (REPO / "platform" / "__init__.py").exists()
