"""Checks on rendered manifests and argocd/ that neither kubernetes-validate nor the doctor do.

  python3 inspect.py crds OUT.json PATH...      custom resources: which are schema-checked where
  python3 inspect.py routes DIR ROUTES_JSON     public routes == xtask/src/edge.rs ROUTES
  python3 inspect.py argocd ARGOCD_DIR ROOT     environments, sync policies, sources exist
  python3 inspect.py promql DIR OUT_DIR         alert rules + dashboard queries for promtool

Every subcommand prints what it checked and exits 1 with one line per problem.
"""

import glob
import json
import os
import re
import sys

import yaml

# Kinds validated offline by validate-crs.mjs (@kubernetes-models JSON schemas).
NODE_VALIDATED = {
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "GatewayClass"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("argoproj.io/v1alpha1", "Application"),
    ("argoproj.io/v1alpha1", "AppProject"),
    ("argoproj.io/v1alpha1", "ApplicationSet"),
}
# Operator kinds with no offline schema in any registry package: allowed (listed in the
# summary as not schema-validated), but any other custom kind is a typo until added here.
KNOWN_UNVALIDATED = {
    ("postgresql.cnpg.io/v1", "Cluster"),
    ("kafka.strimzi.io/v1", "Kafka"),
    ("kafka.strimzi.io/v1", "KafkaNodePool"),
    ("kafka.strimzi.io/v1", "KafkaTopic"),
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy"),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"),
    ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy"),
}
# API groups kubernetes-validate has schemas for (built into Kubernetes).
BUILTIN_GROUPS = {
    "", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
    "scheduling.k8s.io", "storage.k8s.io", "coordination.k8s.io", "discovery.k8s.io",
}


def yaml_files(paths):
    for path in paths:
        if os.path.isfile(path):
            yield path
        else:
            yield from sorted(
                glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True)
                + glob.glob(os.path.join(path, "**", "*.yml"), recursive=True)
            )


def objects(paths):
    for path in yaml_files(paths):
        with open(path, encoding="utf-8") as handle:
            for doc in yaml.safe_load_all(handle):
                if isinstance(doc, dict) and doc.get("kind"):
                    yield path, doc


def group_of(api_version):
    return api_version.split("/")[0] if "/" in api_version else ""


def cmd_crds(out_json, paths):
    for_node, unvalidated, problems = [], {}, []
    for path, doc in objects(paths):
        key = (doc.get("apiVersion", ""), doc["kind"])
        if group_of(key[0]) in BUILTIN_GROUPS:
            continue
        if key in NODE_VALIDATED:
            for_node.append({"file": path, "object": doc})
        elif key in KNOWN_UNVALIDATED:
            label = f"{key[1]} ({key[0]})"
            unvalidated[label] = unvalidated.get(label, 0) + 1
        else:
            problems.append(f"{path}: unknown kind {key[1]} ({key[0]}): typo, or add it to inspect.py")
    with open(out_json, "w", encoding="utf-8") as handle:
        json.dump(for_node, handle)
    print(f"custom resources for schema validation: {len(for_node)}")
    for label, count in sorted(unvalidated.items()):
        print(f"not schema-validated (no offline schema): {count} x {label}")
    return problems


def edge_service_for(path, routes):
    """Same rule as service_for in xtask/src/edge.rs."""
    for prefix, service in routes:
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if prefix.endswith("/") or rest == "" or rest.startswith("/"):
            return "auth" if service == "users" else service
    return None


def cmd_routes(rendered_dir, routes_json):
    routes = json.loads(routes_json)
    expected = {(prefix.rstrip("/"), "auth" if svc == "users" else svc) for prefix, svc in routes}
    found, problems = set(), []
    for path, doc in objects([rendered_dir]):
        name = doc["metadata"]["name"]
        if doc["kind"] == "HTTPRoute" and doc["metadata"].get("namespace") != "gateway":
            for rule in doc["spec"].get("rules", []):
                backends = [ref["name"] for ref in rule.get("backendRefs", [])]
                for match in rule.get("matches", []):
                    found.update((match["path"]["value"], b) for b in backends)
                    if match["path"].get("type") != "PathPrefix":
                        problems.append(f"{path}: {name}: {match['path']} is not a PathPrefix")
        elif doc["kind"] == "Ingress":
            for rule in doc["spec"].get("rules", []):
                for item in rule["http"]["paths"]:
                    found.add((item["path"], item["backend"]["service"]["name"]))
                    if item.get("pathType") != "Prefix":
                        problems.append(f"{path}: {name}: {item['path']} is not pathType Prefix")
    if not found:
        return [f"{rendered_dir}: no HTTPRoute or Ingress rendered"]
    # Backends are <release>-<service>.
    found = {(p, backend.split("-", 1)[1]) for p, backend in found}
    for p, svc in sorted(expected - found):
        problems.append(f"{rendered_dir}: {p} -> {svc} is in edge.rs ROUTES but not routed")
    for p, svc in sorted(found):
        want = edge_service_for(p, routes) or edge_service_for(p + "/", routes)
        if want != svc:
            problems.append(f"{rendered_dir}: {p} -> {svc}, but edge.rs sends it to {want}")
        for private in ("/metrics", "/healthz", "/readyz"):
            if private.startswith(p.rstrip("/") + "/") or private == p or p in ("", "/"):
                problems.append(f"{rendered_dir}: {p} would expose {private}")
    print(f"{rendered_dir}: {len(found)} public path(s) match edge.rs ROUTES")
    return problems


def cmd_argocd(argocd_dir, repo_root):
    problems, apps, envs = [], [], {"dev", "staging", "prod"}
    for path, doc in objects([argocd_dir]):
        if doc["kind"] == "Application":
            apps.append((path, doc))
    for path, app in apps:
        name = app["metadata"]["name"]
        env = (app["metadata"].get("labels") or {}).get("taskstream.io/environment")
        base = os.path.basename(path)
        if env not in envs:
            problems.append(f"{path}: {name} has no taskstream.io/environment label (dev|staging|prod)")
            continue
        if env not in base or not name.endswith(f"-{env}"):
            problems.append(f"{path}: {name} is {env}, but its file or name does not say so")
        automated = "automated" in (app["spec"].get("syncPolicy") or {})
        if env == "prod" and automated:
            problems.append(f"{path}: {name} syncs prod automatically; prod syncs only by hand")
        if env != "prod" and not automated:
            problems.append(f"{path}: {name} ({env}) must sync automatically")
        if app["spec"].get("project") != "taskstream":
            problems.append(f"{path}: {name} is not in the taskstream AppProject")
        source = app["spec"]["source"]
        source_dir = os.path.join(repo_root, source["path"])
        if not os.path.isdir(source_dir):
            problems.append(f"{path}: {name}: source path {source['path']} does not exist")
        for values in (source.get("helm") or {}).get("valueFiles", []):
            if not os.path.isfile(os.path.join(source_dir, values)):
                problems.append(f"{path}: {name}: {source['path']}/{values} does not exist")
            elif values != f"values-{env}.yaml":
                problems.append(f"{path}: {name} ({env}) uses {values}")
    for env in envs:
        if not any(f"-{env}" in app["metadata"]["name"] for _, app in apps):
            problems.append(f"{argocd_dir}: no Application for {env}")
    print(f"argocd: {len(apps)} Applications checked (names, files, sync policy per environment, sources)")
    return problems


def cmd_promql(rendered_dir, out_dir):
    """Writes the alert rules as they are, and every dashboard query as a recording rule, so
    promtool parses each expression."""
    os.makedirs(out_dir, exist_ok=True)
    rules_written, queries = 0, []
    for path, doc in objects([rendered_dir]):
        if doc["kind"] != "ConfigMap":
            continue
        for key, text in (doc.get("data") or {}).items():
            if doc["metadata"]["name"] == "prometheus-rules":
                with open(os.path.join(out_dir, f"rules-{rules_written}-{key}"), "w", encoding="utf-8") as handle:
                    handle.write(text)
                rules_written += 1
            elif key.endswith(".json"):
                dashboard = json.loads(text)
                for panel in dashboard.get("panels", []):
                    for target in panel.get("targets", []):
                        expr = target.get("expr")
                        if expr:
                            # Grafana's variables become what they stand for at query time.
                            expr = expr.replace("$__rate_interval", "5m").replace("$service", ".*")
                            queries.append({"record": f"dashboard:q{len(queries)}", "expr": expr})
    with open(os.path.join(out_dir, "dashboards.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": queries}]}, handle)
    print(f"promql: {rules_written} rule file(s) and {len(queries)} dashboard queries written")
    return [] if rules_written and queries else [f"{rendered_dir}: no rules or dashboard queries found"]


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "crds":
        problems = cmd_crds(args[0], args[1:])
    elif command == "routes":
        problems = cmd_routes(args[0], args[1])
    elif command == "argocd":
        problems = cmd_argocd(args[0], args[1])
    elif command == "promql":
        problems = cmd_promql(args[0], args[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
