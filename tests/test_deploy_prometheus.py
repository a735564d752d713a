"""The chart's alert rules and Grafana dashboard against a real Prometheus
(Debian's package) scraping a real sidecar fed by real frames over gRPC: the
series are found through Prometheus' HTTP API, every rule evaluates without
errors, the frames-rejected alert goes pending/firing when the test sends bad
frames (and not before), every dashboard query runs and returns data, and every
metric name in the rules and the dashboard exists in a live scrape of the sidecar
(names parsed out of the PromQL expressions, no hand-kept list)."""

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import free_port, scrape, wait_for, write_firing_calibration
from eigenwatch.v1 import monitor_pb2

PROMETHEUS = shutil.which("prometheus")
CHART = Path(__file__).resolve().parents[1] / "helm" / "eigenwatch"
RULES = CHART / "files" / "eigenwatch-rules.yaml"
DASHBOARD = CHART / "files" / "eigenwatch-dashboard.json"
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus package is not installed (make test installs it with apt-get)")

# ---- metric names out of PromQL ------------------------------------------------------------
# PromQL's lexer, reduced to what names a series: strings, durations in [...], label matchers
# in {...}, the label lists after by/without/on/ignoring/group_left/group_right, function and
# aggregation names (an identifier followed by "(", or by by/without), keywords and Grafana's $variables are not
# metric names; every other identifier is.
_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})
  | (?P<variable>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<number>(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:ms|s|m|h|d|w|y)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<other>\S)
""", re.X)
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if not m.group().isspace()]
    names, skip_list = set(), False
    for i, (kind, text) in enumerate(tokens):
        if skip_list:  # inside a label list: (a, b)
            if kind == "close":
                skip_list = False
            continue
        if kind != "ident":
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if text.lower() in _LABEL_LISTS:
            if nxt[0] == "open":
                skip_list = True
                tokens[i + 1] = ("skipped", "(")
            continue
        if text.lower() in _KEYWORDS or nxt[0] == "open":
            continue
        if nxt[0] == "ident" and nxt[1].lower() in ("by", "without"):  # sum by (x) (...): an aggregation
            continue
        names.add(text)
    return names


def test_metric_name_parser_on_known_expressions():
    assert metric_names('sum by (layer, le) (rate(a_bucket{model=~"$model", x="by (q)"}[$__rate_interval]))') == {
        "a_bucket"}
    assert metric_names("histogram_quantile(0.9, sum(rate(b_bucket[5m])) by (le)) > 0.5 and on(pod) c") == {
        "b_bucket", "c"}
    assert metric_names('up{job="x"} == 0 or absent(d_total) unless ignoring(field) e offset 1h') == {
        "up", "d_total", "e"}
    assert metric_names("f / g * 1e3 + 0x1f") == {"f", "g"}


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_][A-Za-z0-9_]*\)", q)
            exprs.append(m.group(1) if m else q)
    return exprs


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Grafana sends it: $model = All, $__rate_interval at a 1s scrape."""
    return expr.replace("$__rate_interval", "1m").replace('"$model"', '".*"')


# ---- Prometheus' HTTP API ------------------------------------------------------------------

def api(port: int, path: str, **params):
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, expr: str):
    return api(port, "query", query=expr)["result"]


def try_api(fn):
    try:
        return fn()
    except OSError:
        return None


def scrape_config(target: str) -> str:
    """The chart's ServiceMonitor relabelings (job="eigenwatch"), in a plain scrape config."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        out = chart.render({}, name="rel", namespace="llm")
    (mon,) = [d for d in yaml.safe_load_all(out["eigenwatch/templates/monitor.yaml"]) if d]
    snake = {"targetLabel": "target_label", "sourceLabels": "source_labels"}
    relabel = [{snake.get(k, k): v for k, v in r.items()} for r in mon["spec"]["endpoints"][0]["relabelings"]]
    return yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [{"job_name": "serviceMonitor/llm/rel-eigenwatch/0", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}], "relabel_configs": relabel}],
    })


def test_rules_and_dashboard_against_prometheus_scraping_a_live_sidecar(sidecar_factory, tmp_path):
    pytest.importorskip("helm_python", reason="helm-python-sdk is in the dev extra (make test installs it)")
    from test_sidecar_risk import MODEL, TAP_LAYERS, Pool, Request, batch, ingest, train_risk_model

    risk = train_risk_model(tmp_path / "risk.onnx", seed=2)
    cal = write_firing_calibration(tmp_path / "cal.json", MODEL, TAP_LAYERS)  # spike alerts on every request
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration", str(cal),
                         "--risk-model", str(risk.path))

    # Real frames: requests with normal and spiked windows, each ending with the tap's final frames,
    # and the stats a tap sends with its batches.
    pool = Pool(seed=3)
    reqs = [Request(f"q{i}", [i % 2, 1, 0, 1], pool, seed=10 + i) for i in range(6)]
    stats = monitor_pb2.TapStats(tap_id="tap-0", model=MODEL, frames_emitted=400, frames_dropped=8,
                                 frames_sent=392, rows_seen=4000)
    batches = [batch([f for r in reqs for f in r.frames(t)]) for t in range(4)]
    batches.append(batch([f for r in reqs for f in r.final()]))
    batches[-1].stats.CopyFrom(stats)
    assert ingest(sc.grpc, batches).frames_accepted == sum(len(b.frames) for b in batches)
    live = Request("live", [0, 1], pool, seed=99)  # one request still running: active_requests > 0
    ingest(sc.grpc, [batch(live.frames(0))])

    # The rules as the chart ships them, `for:` shortened to 2s in this temporary copy only,
    # so an alert can fire within the test.
    rules = RULES.read_text()
    shortened = re.sub(r"(?m)^(\s+for:) \S+$", r"\1 2s", rules)
    assert shortened.count("for: 2s") == rules.count("for:")
    (tmp_path / "rules.yaml").write_text(shortened)
    target = sc.metrics.removeprefix("http://").removesuffix("/metrics")
    (tmp_path / "prometheus.yml").write_text(scrape_config(target))
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The series, found through the HTTP API, under the job the rules select.
        wait_for(lambda: try_api(lambda: query(port, f'eigenwatch_frames_ingested_total{{model="{MODEL}"}}')),
                 timeout=60, every=0.5, what="Prometheus to scrape the sidecar")
        up = query(port, 'up{job="eigenwatch"}')
        assert up and up[0]["value"][1] == "1"
        assert query(port, 'eigenwatch_request_max_risk_count{job="eigenwatch"}')
        assert query(port, 'eigenwatch_alerts_total{detector="spectral_spike"}')

        def evaluated():
            groups = api(port, "rules")["groups"]
            rs = [r for g in groups for r in g["rules"]]
            return rs if rs and all(r["health"] == "ok" for r in rs) else None

        # Every rule evaluates without errors (health "ok" after an evaluation; "err" carries lastError).
        rs = wait_for(lambda: try_api(evaluated), timeout=30, every=0.5, what="every rule evaluated with health ok")
        assert {r["name"] for r in rs} == {r["alert"] for g in yaml.safe_load(rules)["groups"] for r in g["rules"]}
        assert all(not r.get("lastError") for r in rs)

        def alert(name):
            return [a for a in api(port, "alerts")["alerts"] if a["labels"]["alertname"] == name]

        # Nothing rejected yet: silent. The sidecar is up: silent.
        assert alert("EigenwatchFramesRejected") == []
        assert alert("EigenwatchSidecarDown") == []

        # Drive the condition: malformed frames (NaN descriptors), twice, across scrapes, so rate() > 0.
        def reject(i):
            bad = Request(f"bad{i}", [0], pool, seed=200 + i).frames(0)[0]
            bad.descriptors[0] = float("nan")
            with pytest.raises(grpc.RpcError) as err:
                ingest(sc.grpc, [batch([bad])])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        reject(0)
        wait_for(lambda: try_api(lambda: query(port, 'eigenwatch_frames_rejected_total{field="descriptors"} >= 1')),
                 timeout=30, every=0.5, what="the first rejection scraped")
        reject(1)
        fired = wait_for(lambda: try_api(lambda: [a for a in alert("EigenwatchFramesRejected")
                                                   if a["state"] in ("pending", "firing")]),
                         timeout=30, every=0.5, what="EigenwatchFramesRejected pending or firing")
        assert fired[0]["labels"]["field"] == "descriptors" and fired[0]["labels"]["severity"] == "warning"
        assert "descriptors" in fired[0]["annotations"]["summary"]
        assert alert("EigenwatchSidecarDown") == []

        # Every dashboard query runs in Prometheus and returns data from this sidecar.
        for expr in dashboard_exprs():
            res = query(port, grafana_to_promql(expr))
            assert res, f"dashboard query returned no series: {expr}"

        # Every metric name of the rules and the dashboard is in a live scrape of the sidecar
        # (`up` is Prometheus' own series about the scrape, checked above).
        from prometheus_client.parser import text_string_to_metric_families

        exported = {s.name for fam in text_string_to_metric_families(scrape(sc.metrics)) for s in fam.samples}
        used = set().union(*(metric_names(e) for e in rule_exprs() + dashboard_exprs()))
        assert "eigenwatch_risk_bucket" in used and "eigenwatch_ingest_streams" in used  # the parser found them
        assert used - {"up"} <= exported, f"not exported by the sidecar: {sorted(used - {'up'} - exported)}"
    finally:
        proc.terminate()
        proc.wait(10)
