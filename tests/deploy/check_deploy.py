#!/usr/bin/env python3
"""Offline checks of the Helm chart (run by scripts/check-deploy.sh in its pinned venv):

1. renders values-dev.yaml and values-production.yaml with Helm's Go SDK (PyPI
   helm-python-sdk; no cluster, no network) and lints the chart strictly;
2. validates every manifest: core kinds with kubernetes-validate (strict, the pinned
   Kubernetes version), KEDA ScaledObject and ServiceMonitor against the strict schemas in
   deploy/schemas/; any other kind is an error;
3. runs checkov's Kubernetes checks on both renders: any failed check fails, and so does a
   skip (`checkov.io/skipN: ID=reason` annotation) without a reason;
4. the policy tests below (unittest): the production text and multimodal pools land on
   different node pools, every Deployment has probes, requests and limits and a PDB, every
   rendered command line parses with this checkout's binaries (--binaries), ...

    check_deploy.py --kube-version 1.35.0 --out DIR [--binaries TARGET/debug]
"""
import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import unittest

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "medgemma"
SCHEMAS = REPO / "deploy" / "schemas"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
PROFILES = {"dev": "values-dev.yaml", "production": "values-production.yaml"}
NAMESPACE = {"dev": "medgemma-dev", "production": "medgemma"}
KUBE_VERSION = "1.35.0"


def merge(base, over):
    """Helm's coalescing of -f files: maps merge deeply, anything else replaces."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def profile_values(profile, overrides=None):
    values = helm.values_from_yaml((CHART / PROFILES[profile]).read_text())
    return merge(values, overrides or {})


def render(profile, overrides=None):
    """The profile's manifests as a list of dicts."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(
            profile_values(profile, overrides),
            name="medgemma",
            namespace=NAMESPACE[profile],
            is_install=True,
        )
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(out[path]):
            if d:
                d.setdefault("metadata", {}).setdefault("annotations", {})
                d["metadata"]["annotations"].pop("__source", None)
                docs.append(d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def validate(docs, kube_version):
    """Schema problems, one string each."""
    problems = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata'].get('name')}"
        key = (d["apiVersion"], d["kind"])
        if key in CRD_SCHEMAS:
            schema = json.loads((SCHEMAS / CRD_SCHEMAS[key]).read_text())
            errors = sorted(
                jsonschema.Draft202012Validator(schema).iter_errors(d), key=lambda e: e.path
            )
            problems += [f"{where}: {list(e.path)}: {e.message}" for e in errors]
            continue
        try:
            kubernetes_validate.validate(d, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{where}: {e.message} (no schema: add it to deploy/schemas)")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{where}: {list(e.path)}: {e.message}")
    return problems


def deployments_problems(docs):
    """Every Deployment: gRPC startup/readiness/liveness probes, requests and limits on every
    container (init containers too), a PDB that selects it, a preStop pause shorter than the
    grace period, the hardened security context."""
    problems = []
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for d in by_kind(docs, "Deployment"):
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        for c in spec.get("containers", []):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "grpc" not in c.get(probe, {}):
                    problems.append(f"{name}/{c['name']}: no gRPC {probe}")
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        problems.append(f"{name}/{c['name']}: no {r} {kind}")
            sc = c.get("securityContext", {})
            if not (
                sc.get("readOnlyRootFilesystem")
                and sc.get("allowPrivilegeEscalation") is False
                and sc.get("runAsNonRoot")
                and "ALL" in sc.get("capabilities", {}).get("drop", [])
            ):
                problems.append(f"{name}/{c['name']}: security context not hardened")
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus and d["spec"]["strategy"]["rollingUpdate"].get("maxUnavailable") != 0:
                problems.append(f"{name}: a GPU pool must roll with maxUnavailable 0")
        if spec.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        main = spec["containers"][0]
        pause = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if not pause or spec.get("terminationGracePeriodSeconds", 30) <= pause:
            problems.append(f"{name}: needs a preStop pause shorter than the grace period")
        if not any(
            all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
            for p in pdbs
        ):
            problems.append(f"{name}: no PodDisruptionBudget selects it")
    return problems


def quantity(q):
    """Bytes of a Kubernetes quantity (binary and decimal suffixes)."""
    q = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for u in sorted(units, key=len, reverse=True):
        if q.endswith(u):
            return float(q[: -len(u)]) * units[u]
    return float(q)


def ephemeral_problems(docs):
    """A pod's disk-backed emptyDirs must fit its ephemeral-storage limit (the kubelet evicts
    a pod whose emptyDirs and logs exceed it): max(init limits, sum of container limits)."""
    problems = []
    for d in by_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]

        def limit(c):
            return quantity(c["resources"]["limits"].get("ephemeral-storage", 0))

        pod_limit = max(
            [limit(c) for c in spec.get("initContainers", [])]
            + [sum(limit(c) for c in spec["containers"])]
        )
        dirs = sum(
            quantity(v["emptyDir"]["sizeLimit"])
            for v in spec.get("volumes", [])
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
        )
        if dirs > pod_limit:
            problems.append(
                f"{d['metadata']['name']}: emptyDirs of {dirs / 2**30:.2f} GiB exceed the "
                f"ephemeral-storage limit of {pod_limit / 2**30:.2f} GiB"
            )
    return problems


def flag_problems(docs, bindir):
    """Every container's command line, run against this checkout's binaries with --help
    appended: clap parses (and value-checks) every flag before it prints the help, so an
    unknown flag or a bad value fails. Env values are passed as the pod would."""
    problems = []
    for d in by_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
            env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
            argv = [str(pathlib.Path(bindir) / c["command"][0])] + c.get("args", []) + ["--help"]
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                err = (r.stderr or r.stdout).strip().splitlines()
                problems.append(f"{d['metadata']['name']}/{c['name']}: {' '.join(argv[1:-1])}: "
                                f"{err[0] if err else r.returncode}")
    return problems


def node_pool_terms(deployment):
    """{label: set of allowed values} a Deployment's pods require of their node."""
    spec = deployment["spec"]["template"]["spec"]
    req = {k: {v} for k, v in spec.get("nodeSelector", {}).items()}
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for t in terms:
        for e in t.get("matchExpressions", []):
            if e["operator"] == "In":
                req[e["key"]] = req.get(e["key"], set(e["values"])) & set(e["values"])
    return req


def disjoint_pools_problem(docs, a, b):
    """None if Deployments a and b can never share a node (some node label must take
    different values), else why not."""
    deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    if a not in deps or b not in deps:
        return f"missing Deployment {a} or {b}"
    ra, rb = node_pool_terms(deps[a]), node_pool_terms(deps[b])
    if any(k in rb and not (ra[k] & rb[k]) for k in ra):
        return None
    return f"{a} ({ra}) and {b} ({rb}) may land on the same node pool"


def checkov(paths, out_dir):
    """(failed checks, skips without a reason, counts) from checkov on the given files."""
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "checkov"),
        "--framework", "kubernetes", "--skip-download", "--quiet", "--compact",
        "-o", "json", "--output-file-path", str(out_dir),
    ]
    for p in paths:
        cmd += ["-f", str(p)]
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    report = json.loads((pathlib.Path(out_dir) / "results_json.json").read_text())
    reports = report if isinstance(report, list) else [report]
    failed, unjustified, counts = [], [], {"passed": 0, "failed": 0, "skipped": 0}
    for r in reports:
        for k in counts:
            counts[k] += r.get("summary", {}).get(k, 0)
        res = r.get("results", {})
        for c in res.get("failed_checks", []):
            failed.append(f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})")
        for c in res.get("skipped_checks", []):
            reason = (c.get("suppress_comment") or "").strip()
            if not reason or reason == "No comment provided":
                unjustified.append(f"{c['check_id']}: {c['resource']}: skipped without a reason")
    if sum(counts.values()) == 0:
        failed.append("checkov scanned nothing")
    return failed, unjustified, counts


RENDERS = {}


def rendered(profile):
    if profile not in RENDERS:
        RENDERS[profile] = render(profile)
    return RENDERS[profile]


class Production(unittest.TestCase):
    def test_text_and_multimodal_pools_on_different_node_pools(self):
        docs = rendered("production")
        self.assertIsNone(
            disjoint_pools_problem(docs, "medgemma-generator-text", "medgemma-generator-multimodal")
        )
        # The vision encoder sits with the multimodal generator, away from the text pool.
        self.assertIsNone(disjoint_pools_problem(docs, "medgemma-generator-text", "medgemma-vision"))
        mm = node_pool_terms(next(d for d in docs if d["metadata"]["name"] == "medgemma-vision"))
        gen = node_pool_terms(
            next(d for d in docs if d["metadata"]["name"] == "medgemma-generator-multimodal")
        )
        self.assertEqual(mm, gen)

    def test_gpu_pools_request_gpus_and_tolerate_their_taints(self):
        for name in ("medgemma-generator-text", "medgemma-generator-multimodal", "medgemma-vision"):
            d = next(d for d in rendered("production") if d["metadata"]["name"] == name)
            spec = d["spec"]["template"]["spec"]
            self.assertEqual(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], 1)
            self.assertTrue(any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]))
            self.assertIn("dshm", [v["name"] for v in spec["volumes"]])

    def test_every_deployment_has_probes_limits_and_a_pdb(self):
        for profile in PROFILES:
            with self.subTest(profile=profile):
                self.assertEqual(deployments_problems(rendered(profile)), [])

    def test_emptydirs_fit_the_ephemeral_storage_limits(self):
        for profile in PROFILES:
            with self.subTest(profile=profile):
                self.assertEqual(ephemeral_problems(rendered(profile)), [])

    def test_gateway_points_at_the_headless_backend_services(self):
        for profile in PROFILES:
            docs = rendered(profile)
            services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
            gw = next(d for d in docs if d["metadata"]["name"] == "medgemma-gateway")
            args = gw["spec"]["template"]["spec"]["containers"][0]["args"]
            flags = dict(zip(args[::2], args[1::2]))
            for flag, svc in {
                "--tokenizer-addr": "medgemma-tokenizer",
                "--text-pool": "medgemma-generator-text",
                "--multimodal-pool": "medgemma-generator-multimodal",
                "--vision-pool": "medgemma-vision",
            }.items():
                host, port = flags[flag].rsplit(":", 1)
                self.assertEqual(host, f"{svc}.{NAMESPACE[profile]}.svc.cluster.local")
                self.assertEqual(services[svc]["spec"].get("clusterIP"), "None", svc)
                self.assertEqual(int(port), services[svc]["spec"]["ports"][0]["port"])
            self.assertNotEqual(services["medgemma-gateway"]["spec"].get("clusterIP"), "None")

    def test_production_is_mtls_with_api_keys_and_probes_on_the_health_port(self):
        for d in by_kind(rendered("production"), "Deployment"):
            name = d["metadata"]["name"]
            c = d["spec"]["template"]["spec"]["containers"][0]
            flags = dict(zip(c["args"][::2], c["args"][1::2]))
            self.assertEqual(flags["--tls-cert"], "/etc/medgemma/tls/tls.crt", name)
            self.assertEqual(flags["--health-listen"], "0.0.0.0:8081", name)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                self.assertEqual(c[probe]["grpc"]["port"], 8081, (name, probe))
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            self.assertTrue(mounts["tls"]["readOnly"], name)
            if name == "medgemma-gateway":
                self.assertEqual(flags["--tls-ca"], "/etc/medgemma/tls/ca.crt")
                self.assertEqual(flags["--api-keys"], "/etc/medgemma/api-keys/keys.json")
                self.assertEqual(flags["--reflection"], "false")
                self.assertEqual(flags["--audit-log"], "-")
                self.assertIn("api-keys", mounts)
            else:
                self.assertEqual(flags["--tls-client-ca"], "/etc/medgemma/tls/ca.crt", name)
                self.assertNotIn("api-keys", mounts, name)
        # The dev profile stays plaintext on the demo, open by explicit choice.
        gw = next(d for d in rendered("dev") if d["metadata"]["name"] == "medgemma-gateway")
        args = gw["spec"]["template"]["spec"]["containers"][0]["args"]
        self.assertNotIn("--tls-cert", args)
        self.assertEqual(dict(zip(args[::2], args[1::2]))["--auth"], "none")

    def test_generator_pools_scale_on_waiting_requests_and_cpu_pools_on_cpu(self):
        docs = rendered("production")
        scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind(docs, "ScaledObject")}
        for pool in ("text", "multimodal"):
            so = scaled[f"medgemma-generator-{pool}"]
            self.assertIn("medgemma:num_requests_waiting", so["spec"]["triggers"][0]["metadata"]["query"])
        hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler")}
        for name in ("medgemma-gateway", "medgemma-tokenizer"):
            self.assertEqual(hpas[name]["spec"]["metrics"][0]["resource"]["name"], "cpu")
        # The HPA alternative renders the custom-metric HPA and the adapter rule.
        alt = render("production", {"generators": {"text": {"autoscaling": {"mode": "hpa"}}}})
        hpa = next(h for h in by_kind(alt, "HorizontalPodAutoscaler")
                   if h["metadata"]["name"] == "medgemma-generator-text")
        self.assertEqual(hpa["spec"]["metrics"][0]["pods"]["metric"]["name"], "medgemma_num_requests_waiting")
        rules = next(c for c in by_kind(alt, "ConfigMap") if c["metadata"]["name"].endswith("adapter-rules"))
        self.assertIn("medgemma:num_requests_waiting", rules["data"]["config.yaml"])
        self.assertEqual(validate(alt, KUBE_VERSION), [])

    def test_metrics_are_served_where_prometheus_scrapes_and_generators_plan_gpu_memory(self):
        docs = rendered("production")
        for d in by_kind(docs, "Deployment"):
            c = d["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(env["MEDGEMMA_METRICS_ADDR"], f"0.0.0.0:{ports['metrics']}", d["metadata"]["name"])
            if d["metadata"]["name"].startswith("medgemma-generator-"):
                flags = dict(zip(c["args"][::2], c["args"][1::2]))
                self.assertEqual(flags["--gpu-memory-utilization"], "0.9", d["metadata"]["name"])
        # The gateway drains as long as the generators: streams live as long as generations.
        gw = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "medgemma-gateway")
        gen = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "medgemma-generator-text")
        drain = lambda d: dict(zip(d["spec"]["template"]["spec"]["containers"][0]["args"][::2],
                                   d["spec"]["template"]["spec"]["containers"][0]["args"][1::2]))
        self.assertEqual(drain(gw)["--drain-timeout"], "120s")
        self.assertEqual(drain(gen)["--drain-timeout-s"], "120")
        self.assertGreater(gw["spec"]["template"]["spec"]["terminationGracePeriodSeconds"], 120)
        dev = rendered("dev")
        for d in by_kind(dev, "Deployment"):
            args = d["spec"]["template"]["spec"]["containers"][0]["args"]
            self.assertNotIn("--gpu-memory-utilization", args, "CPU pools plan no GPU memory")

    def test_only_the_gateway_is_reachable_from_outside(self):
        docs = rendered("production")
        nps = {n["metadata"]["name"]: n for n in by_kind(docs, "NetworkPolicy")}
        self.assertEqual(nps["medgemma-default-deny"]["spec"].get("ingress"), None)
        backends = nps["medgemma-backends"]["spec"]
        comps = backends["podSelector"]["matchExpressions"][0]["values"]
        self.assertEqual(
            sorted(comps), ["generator-multimodal", "generator-text", "tokenizer", "vision"]
        )
        grpc_rule = backends["ingress"][0]
        self.assertEqual(
            grpc_rule["from"],
            [{"podSelector": {"matchLabels": {
                "app.kubernetes.io/name": "medgemma",
                "app.kubernetes.io/instance": "medgemma",
                "app.kubernetes.io/component": "gateway"}}}],
        )

    def test_weights_come_from_fetch_model_with_the_token_as_a_file(self):
        d = next(d for d in rendered("production") if d["metadata"]["name"] == "medgemma-generator-text")
        spec = d["spec"]["template"]["spec"]
        init = spec["initContainers"][0]
        self.assertEqual(init["args"][:2], ["fetch-model", "google/medgemma-27b-text-it"])
        env = {e["name"]: e for e in init["env"]}
        self.assertIn("HF_TOKEN_PATH", env)
        self.assertNotIn("HF_TOKEN", env)
        main = spec["containers"][0]
        mount = next(m for m in main["volumeMounts"] if m["name"] == "model")
        self.assertTrue(mount["readOnly"])
        self.assertIn("/models/text", main["args"])
        # A pre-filled read-only volume needs no download and no token.
        pre = render("production", {"models": {"text": {"storage": {
            "type": "existing",
            "volume": {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}}}}})
        d = next(d for d in pre if d["metadata"]["name"] == "medgemma-generator-text")
        self.assertNotIn("initContainers", d["spec"]["template"]["spec"])
        self.assertEqual(validate(pre, KUBE_VERSION), [])


BINARIES = None


class Flags(unittest.TestCase):
    def test_every_command_line_parses_with_the_binaries_of_this_checkout(self):
        if BINARIES is None:
            self.skipTest("no --binaries given")
        for profile in PROFILES:
            with self.subTest(profile=profile):
                self.assertEqual(flag_problems(rendered(profile), BINARIES), [])

    def test_an_unknown_flag_is_caught(self):
        if BINARIES is None:
            self.skipTest("no --binaries given")
        docs = render("dev", {"generators": {"text": {"extraArgs": ["--no-such-flag"]}}})
        problems = flag_problems(docs, BINARIES)
        self.assertTrue(any("generator-text" in p and "--no-such-flag" in p for p in problems), problems)


class Dev(unittest.TestCase):
    def test_dev_is_cpu_only_one_replica_each_on_the_demo(self):
        docs = rendered("dev")
        deps = by_kind(docs, "Deployment")
        self.assertEqual(len(deps), 5)
        for d in deps:
            spec = d["spec"]["template"]["spec"]
            self.assertEqual(d["spec"]["replicas"], 1)
            for c in spec["containers"]:
                self.assertNotIn("nvidia.com/gpu", c["resources"]["limits"])
                self.assertNotIn("cuda", " ".join(c["args"]))
        self.assertEqual(by_kind(docs, "PersistentVolumeClaim"), [])
        gen = next(d for d in deps if d["metadata"]["name"] == "medgemma-generator-text")
        self.assertEqual(gen["spec"]["template"]["spec"]["initContainers"][0]["args"][0], "fetch-demo")


class TheChecksCatchBreakage(unittest.TestCase):
    """The checks above fail on broken renders (they are not vacuous)."""

    def test_pools_on_one_node_pool_are_caught(self):
        docs = render("production", {"generators": {"multimodal": {"nodePool": "text"}}})
        self.assertIsNotNone(
            disjoint_pools_problem(docs, "medgemma-generator-text", "medgemma-generator-multimodal")
        )

    def test_missing_probe_limit_or_pdb_is_caught(self):
        docs = copy.deepcopy(rendered("production"))
        dep = next(d for d in docs if d["metadata"]["name"] == "medgemma-tokenizer")
        del dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
        del dep["spec"]["template"]["spec"]["initContainers"][0]["resources"]["limits"]
        docs = [d for d in docs if not (d["kind"] == "PodDisruptionBudget"
                                         and d["metadata"]["name"] == "medgemma-tokenizer")]
        problems = deployments_problems(docs)
        self.assertTrue(any("livenessProbe" in p for p in problems), problems)
        self.assertTrue(any("no cpu limits" in p for p in problems), problems)
        self.assertTrue(any("PodDisruptionBudget" in p for p in problems), problems)

    def test_an_emptydir_over_the_ephemeral_limit_is_caught(self):
        docs = render("production", {"generators": {"text": {
            "quantize": "q4k", "cacheSizeLimit": "20Gi"}}})
        self.assertTrue(any("generator-text" in p for p in ephemeral_problems(docs)))

    def test_schema_errors_are_caught(self):
        docs = copy.deepcopy(rendered("production"))
        next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
        next(d for d in docs if d["kind"] == "ScaledObject")["spec"]["maxReplicaCount"] = "many"
        next(d for d in docs if d["kind"] == "ServiceMonitor")["spec"]["endpoints"][0]["unknown"] = 1
        docs.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
        problems = validate(docs, KUBE_VERSION)
        for what in ("bogus", "maxReplicaCount", "unknown", "Widget"):
            self.assertTrue(any(what in p for p in problems), (what, problems))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kube-version", default=KUBE_VERSION)
    ap.add_argument("--out", required=True, help="where the renders and reports go")
    ap.add_argument("--binaries", help="a directory with the five binaries: check every rendered "
                    "command line against them")
    args = ap.parse_args()
    global BINARIES
    BINARIES = args.binaries
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0

    lint = helm.lint(str(CHART), profile_values("production"), strict=True,
                     kube_version=f"v{args.kube_version}")
    bad = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + lint.get("errors", [])
    print(f"helm lint --strict (kube {args.kube_version}): {len(bad)} problems")
    for m in bad:
        print(f"  {m}")
    failures += len(bad)

    files = []
    for profile in PROFILES:
        docs = rendered(profile)
        path = out / f"{profile}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append(path)
        problems = validate(docs, args.kube_version)
        kinds = sorted({d["kind"] for d in docs})
        print(f"{profile}: {len(docs)} manifests ({', '.join(kinds)}), "
              f"kubernetes {args.kube_version} strict schemas: {len(problems)} problems")
        for p in problems:
            print(f"  {p}")
        failures += len(problems)

    failed, unjustified, counts = checkov(files, out / "checkov")
    print(f"checkov (kubernetes): {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped with a reason")
    for f in failed + unjustified:
        print(f"  {f}")
    failures += len(failed) + len(unjustified)

    result = unittest.TextTestRunner(verbosity=1).run(
        unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    )
    failures += len(result.failures) + len(result.errors)
    failed_n = len(result.failures) + len(result.errors)
    print(f"chart tests: {result.testsRun - failed_n - len(result.skipped)} passed, {failed_n} failed"
          + (f", {len(result.skipped)} skipped" if result.skipped else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
