"""The Helm chart (helm/eigenwatch) rendered by real Helm v4 (helm-python-sdk):
every documented variant renders, lints, validates strictly against Kubernetes'
own schemas (kubernetes-validate), wires files, ports, probes and labels
consistently, and bad values fail schema validation naming the value. The
alert rules pass `promtool check rules` and their unit tests."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extra (make test installs it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "eigenwatch"
RULES = CHART / "files" / "eigenwatch-rules.yaml"
RULES_TESTS = CHART / "files" / "eigenwatch-rules.test.yaml"
DASHBOARD = CHART / "files" / "eigenwatch-dashboard.json"
KUBE = "1.31.0"
CRDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # Prometheus Operator kinds, not in Kubernetes' schemas
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="Debian's prometheus package is not installed (make test installs it with apt-get)")

# The documented variants (README "Values" and "Variants"), by name.
CALIBRATION = json.dumps({"format": "eigenwatch.calibration/v1", "detector": "spectral_spike",
                          "models": {"m": {"1": {"sigma2": 0.5, "spike_threshold": 3}}}})
VARIANTS = {
    "default": {},
    "unix-socket": {"sidecar": {"transport": "unix"}},
    "tls-mtls": {"tls": {"enabled": True, "secretName": "ew-tls", "serverName": "eigenwatch.local",
                         "clientCA": {"secretName": "ew-client-ca"}, "tapClientSecretName": "ew-tap-tls"}},
    "own-token-secret": {"auth": {"token": {"create": False, "secretName": "my-token", "secretKey": "bearer"}}},
    "no-auth": {"auth": {"token": {"enabled": False}, "allowInsecureListen": True}},
    "calibration-inline": {"calibration": {"data": CALIBRATION}},
    "calibration-configmap": {"calibration": {"existingConfigMap": "my-calibration", "fileName": "cal.json"}},
    "calibration-volume": {"calibration": {"volume": {"persistentVolumeClaim": {"claimName": "calib"}}}},
    "calibration-sidecar-only": {"calibration": {"data": CALIBRATION}, "vllm": {"tap": {"combined": False}}},
    "attach-calibration": {"mode": "attach", "attach": {"podSelector": {"app": "vllm"}},
                           "calibration": {"existingConfigMap": "my-calibration"}},
    "podmonitor-networkpolicy": {
        "prometheus": {"release": "prom", "monitor": {"kind": "PodMonitor"}},
        "networkPolicy": {"enabled": True, "metricsFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
        "vllm": {"replicas": 3, "extraArgs": ["--tensor-parallel-size", "2"],
                 "resources": {"limits": {"nvidia.com/gpu": 2}}, "tap": {"layers": "4,16,-4"}},
    },
    "attach": {"mode": "attach", "attach": {"podSelector": {"app": "vllm"}, "modelName": "llama-3-8b"},
               "networkPolicy": {"enabled": True}, "prometheus": {"release": "monitoring"}},
    "attach-unix-podmonitor": {"mode": "attach", "attach": {"podSelector": {"app": "vllm"}, "vllmContainer": "server"},
                               "sidecar": {"transport": "unix"}, "prometheus": {"monitor": {"kind": "PodMonitor"}}},
    "nothing-optional": {"prometheus": {"monitor": {"enabled": False}, "rules": {"enabled": False}},
                         "grafana": {"dashboard": {"enabled": False}}, "auth": {"token": {"enabled": False}},
                         "sidecar": {"transport": "unix"}},
}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values, name="rel", namespace="llm"):
    out = chart.render(values, name=name, namespace=namespace)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [(path, d) for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for _, d in docs if d["kind"] == kind]


def merged(chart, values):
    return chart.merge_values(values)


# ---- strategic merge, the way `kubectl patch` merges a Deployment patch ------------------

MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(base, patch, key=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            hit = next((i for i, b in enumerate(out) if b.get(mk) == item.get(mk)), None)
            if hit is None:
                out.append(copy.deepcopy(item))
            else:
                out[hit] = strategic_merge(out[hit], item, None)
        return out
    return copy.deepcopy(patch)


def existing_vllm_deployment(container="vllm"):
    """A vLLM Deployment as a user already runs it (the attach mode's target)."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "vllm", "namespace": "llm", "labels": {"app": "vllm"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "vllm"}},
                 "template": {"metadata": {"labels": {"app": "vllm"}},
                              "spec": {"containers": [{
                                  "name": container, "image": "eigenwatch/vllm-openai:0.1.0",
                                  "args": ["--model", "meta-llama/Meta-Llama-3-8B-Instruct"],
                                  "env": [{"name": "HF_HOME", "value": "/data"}],
                                  "ports": [{"name": "http", "containerPort": 8000}],
                                  "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                                  "volumes": [{"name": "data", "emptyDir": {}}]}}},
    }


def workloads(docs, values):
    """The Deployment(s) whose pods run the sidecar: rendered (deploy), or the
    user's Deployment with the rendered patch applied (attach)."""
    if values.get("mode") == "attach":
        (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-patch")]
        patch = yaml.safe_load(cm["data"]["patch.yaml"])
        base = existing_vllm_deployment(values["attach"].get("vllmContainer", "vllm"))
        return [strategic_merge(base, patch)]
    return by_kind(docs, "Deployment")


def containers(dep):
    cs = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    sidecar = cs.pop("eigenwatch")
    (vllm,) = cs.values()
    return sidecar, vllm


def assert_file_mounted(pod, container, path):
    """`path` lies under one of the container's mounts, whose volume is in the pod and
    (for ConfigMap/Secret volumes that list items) projects that very file."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        if path.startswith(root):
            vol = volumes[m["name"]]
            rel = path[len(root):]
            src = vol.get("secret") or vol.get("configMap")
            if src and "items" in src:
                assert rel in [i["path"] for i in src["items"]], (path, vol)
            return vol
    raise AssertionError(f"{path} is under no volumeMount of container {container['name']}")


def sidecar_args(sidecar):
    from eigenwatch.monitor.cli.main import build_parser

    try:
        return build_parser().parse_args(["sidecar", *sidecar["args"]])
    except SystemExit:
        pytest.fail(f"`eigenwatch sidecar` refuses the chart's arguments: {sidecar['args']}")


def dockerfile_healthcheck():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    return json.loads(line[line.index("CMD") + 3:].strip())


# ---- the tests ---------------------------------------------------------------------------

def test_lint_passes_with_no_errors_or_warnings():
    report = helm.lint(CHART, strict=True, kube_version="v1.31.0")
    assert report["errors"] == [], report
    assert all(m["severity"] < 2 for m in report["messages"]), report
    for values in VARIANTS.values():
        report = helm.lint(CHART, values, kube_version="v1.31.0")
        assert report["errors"] == [], (values, report)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_renders_and_validates_against_kubernetes_schemas(chart, variant):
    values = VARIANTS[variant]
    chart.validate_schema(merged(chart, values))
    docs = render(chart, values)
    kinds = {d["kind"] for _, d in docs}
    for path, doc in docs:
        if doc["kind"] in CRDS:
            continue  # not in Kubernetes' schemas; their shape is checked below and by promtool
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path} ({doc['kind']} {doc['metadata']['name']}) is not valid Kubernetes {KUBE}: {exc}")
    v = merged(chart, values)
    for dep in workloads(docs, values):
        kubernetes_validate.validate(dep, KUBE, strict=True)  # the patched user Deployment too
        pod = dep["spec"]["template"]["spec"]
        sidecar, vllm = containers(dep)
        args = sidecar_args(sidecar)

        # Resources, a non-root read-only sidecar.
        assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
        assert sidecar["securityContext"]["runAsNonRoot"] and sidecar["securityContext"]["readOnlyRootFilesystem"]

        # Every file a flag or a tap variable names is mounted from its Secret/ConfigMap/volume.
        for flag in ("calibration", "token_file", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(args, flag):
                assert_file_mounted(pod, sidecar, getattr(args, flag))
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        assert env["EIGENWATCH_ENABLE"] == "1"
        for var in ("EIGENWATCH_TOKEN_FILE", "EIGENWATCH_TLS_CA", "EIGENWATCH_TLS_CERT", "EIGENWATCH_TLS_KEY",
                    "EIGENWATCH_CALIBRATION"):
            if var in env:
                assert_file_mounted(pod, vllm, env[var])
        # The tap gets the sidecar's calibration (the live combined score) unless told not to.
        assert env.get("EIGENWATCH_CALIBRATION") == (args.calibration if v["vllm"]["tap"]["combined"] else None)
        assert ("EIGENWATCH_TOKEN_FILE" in env) == bool(args.token_file) == v["auth"]["token"]["enabled"]
        assert bool(args.tls_cert) == ("EIGENWATCH_TLS_CA" in env) == v["tls"]["enabled"]
        if values.get("mode") == "attach":  # the user's own settings survive the patch
            assert env["HF_HOME"] == "/data" and {"name": "data", "mountPath": "/data"} in vllm["volumeMounts"]

        # The tap dials where the sidecar listens; a unix socket sits in a volume both mount.
        if args.listen.startswith("unix://"):
            assert env["EIGENWATCH_SIDECAR"] == args.listen
            sock_dir = str(Path(args.listen.removeprefix("unix://")).parent)
            vol_s = assert_file_mounted(pod, sidecar, args.listen.removeprefix("unix://"))
            vol_v = assert_file_mounted(pod, vllm, args.listen.removeprefix("unix://"))
            assert vol_s is vol_v and "emptyDir" in vol_s, sock_dir
        else:
            port = int(args.listen.rsplit(":", 1)[1])
            assert env["EIGENWATCH_SIDECAR"] == f"127.0.0.1:{port}"
            assert {"name": "ew-grpc", "containerPort": port, "protocol": "TCP"} in sidecar["ports"]
            assert args.token_file or args.tls_client_ca or args.allow_insecure_listen, \
                "a non-loopback gRPC address needs a token or client certificates"

        # Liveness and readiness through the gRPC health service.
        for probe, service in (("livenessProbe", ""), ("readinessProbe", "eigenwatch.v1.Monitor")):
            p = sidecar[probe]
            if args.listen.startswith("unix://"):
                assert p["exec"]["command"] == dockerfile_healthcheck()  # the image's HEALTHCHECK, same command
                health_env = {e["name"]: e["value"] for e in sidecar["env"]}
                assert health_env["EIGENWATCH_HEALTH_TARGET"] == args.listen
            elif args.tls_cert:
                assert p["tcpSocket"]["port"] == "ew-grpc"  # kubelet's gRPC probe speaks no TLS
            else:
                assert p["grpc"] == {"port": port, "service": service}

    # Services select the sidecar's pods and name ports the containers have.
    pods = workloads(docs, values)
    (svc,) = by_kind(docs, "Service")
    pod_labels = pods[0]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for c in pods[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    assert ("grpc" in {p["name"] for p in svc["spec"]["ports"]}) == (v["sidecar"]["transport"] == "tcp")

    # ServiceMonitor / PodMonitor: the release label, a selector that matches, the job the rules expect.
    monitors = by_kind(docs, "ServiceMonitor") + by_kind(docs, "PodMonitor")
    if v["prometheus"]["monitor"]["enabled"]:
        (mon,) = monitors
        assert mon["kind"] == v["prometheus"]["monitor"]["kind"]
        assert mon["metadata"]["labels"]["release"] == v["prometheus"]["release"]
        sel = mon["spec"]["selector"]["matchLabels"]
        if mon["kind"] == "ServiceMonitor":
            assert sel.items() <= svc["metadata"]["labels"].items()
            (ep,) = mon["spec"]["endpoints"]
            assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
        else:
            assert sel.items() <= pod_labels.items()
            (ep,) = mon["spec"]["podMetricsEndpoints"]
            assert ep["port"] in port_names
        assert {"action": "replace", "targetLabel": "job", "replacement": "eigenwatch"} in ep["relabelings"]
        assert mon["spec"]["namespaceSelector"]["matchNames"] == ["llm"]
    else:
        assert monitors == []

    rules = by_kind(docs, "PrometheusRule")
    if v["prometheus"]["rules"]["enabled"]:
        (rule,) = rules
        assert rule["metadata"]["labels"]["release"] == v["prometheus"]["release"]
        assert rule["spec"] == yaml.safe_load(RULES.read_text())  # the plain file, embedded as it is
    else:
        assert rules == []

    dashboards = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    if v["grafana"]["dashboard"]["enabled"]:
        (cm,) = dashboards
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(cm["data"]["eigenwatch.json"]) == json.loads(DASHBOARD.read_text())
    else:
        assert dashboards == []

    secrets = by_kind(docs, "Secret")
    if v["auth"]["token"]["enabled"] and v["auth"]["token"]["create"]:
        (secret,) = secrets
        assert secret["metadata"]["name"] == "rel-eigenwatch-token" and secret["data"]["token"]
    else:
        assert secrets == []
    if v["calibration"]["data"]:
        (cal,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-calibration")]
        assert json.loads(cal["data"]["calibration.json"]) == json.loads(CALIBRATION)

    policies = by_kind(docs, "NetworkPolicy")
    assert bool(policies) == v["networkPolicy"]["enabled"]
    for pol in policies:
        assert pol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        allowed = {p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]}
        container_ports = {p["containerPort"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        assert container_ports <= allowed  # the policy selects the vLLM pods: serving stays open
    assert "Deployment" in kinds or values.get("mode") == "attach"


def test_prometheus_rule_spec_passes_promtool(chart, tmp_path):
    if PROMTOOL is None:
        pytest.skip("Debian's prometheus package is not installed (make test installs it with apt-get)")
    values = {"prometheus": {"rules": {"runbookBaseUrl": "https://runbooks.example.com/eigenwatch"}}}
    (rule,) = by_kind(render(chart, values), "PrometheusRule")
    path = tmp_path / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith("https://runbooks.example.com/eigenwatch#") for u in urls)


@pytest.mark.parametrize("values, names", [
    ({"vllm": {"replicas": "3"}}, "/vllm/replicas"),
    ({"auth": {"token": {"create": False}}}, "/auth/token/secretName"),
    ({"tls": {"enabled": True, "serverName": "x"}}, "/tls/secretName"),
    ({"tls": {"enabled": True, "secretName": "s", "serverName": "x", "clientCA": {"secretName": "ca"}}},
     "/tls/tapClientSecretName"),
    ({"mode": "attach"}, "/attach/podSelector"),
    ({"mode": "sidecar"}, "/mode"),
    ({"sidecar": {"transport": "udp"}}, "/sidecar/transport"),
    ({"sidecar": {"grpcPort": 70000}}, "/sidecar/grpcPort"),
    ({"sidecar": {"resources": {"limits": {"memory": "lots"}}}}, "/sidecar/resources/limits/memory"),
    ({"prometheus": {"release": ""}}, "/prometheus/release"),
    ({"prometheus": {"monitor": {"kind": "Probe"}}}, "/prometheus/monitor/kind"),
    ({"vllm": {"tap": {"layers": "first,last"}}}, "/vllm/tap/layers"),
    ({"sidecarr": {}}, "sidecarr"),
])
def test_bad_values_fail_schema_validation_naming_the_value(chart, values, names):
    for call in (lambda: chart.validate_schema(merged(chart, values)), lambda: chart.render(values)):
        with pytest.raises(helm.HelmValuesError) as err:
            call()
        assert names in str(err.value), str(err.value)


def test_conflicting_calibration_sources_fail_rendering_naming_them(chart):
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render({"calibration": {"data": CALIBRATION, "existingConfigMap": "mine"}})
    assert "calibration.existingConfigMap" in str(err.value) and "calibration.data" in str(err.value)


def _flatten(values, prefix=""):
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, path + ".")
        else:
            yield path


def test_chart_readme_documents_every_value_and_runbook_every_alert():
    readme = (CHART / "README.md").read_text()
    def documented(path):  # the value itself, or the Kubernetes object it sits in (sidecar.resources)
        parts = path.split(".")
        return any(f"`{'.'.join(parts[:n])}`" in readme for n in range(min(2, len(parts)), len(parts) + 1))

    missing = [p for p in _flatten(yaml.safe_load((CHART / "values.yaml").read_text())) if not documented(p)]
    assert missing == [], f"values missing from helm/eigenwatch/README.md's table: {missing}"

    runbook = (CHART / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["for"] and rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
            assert anchor == rule["alert"].lower() and anchor in anchors, (rule["alert"], anchor)


@needs_promtool
def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", RULES_TESTS.name], capture_output=True, text=True,
                          cwd=RULES_TESTS.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    # Every alert is exercised by a unit test that expects it to fire.
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert fired == alerts
