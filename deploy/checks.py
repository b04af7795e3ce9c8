#!/usr/bin/env python3
"""Structural and consistency checks for deploy/, driven by deploy/check.sh.

Each subcommand prints nothing and exits 0 when the check holds, or prints one
problem per line and exits 1. The schema validators (hadolint,
check-jsonschema, kubernetes-validate, promtool) are run by check.sh itself;
this file checks what no schema can: that the files agree with each other and
with tollgate's interface (metric names, admin endpoints, drain timeout).

Needs Python 3.11+ (tomllib) and PyYAML.
"""
from __future__ import annotations

import base64
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent

# The metric families tollgate exposes (the interface contract). Histograms
# also expose <name>_bucket, <name>_sum and <name>_count.
METRICS = {
    "tollgate_build_info": "gauge",
    "tollgate_token_fetch_total": "counter",
    "tollgate_token_fetch_duration_seconds": "histogram",
    "tollgate_token_expiry_timestamp_seconds": "gauge",
    "tollgate_token_valid": "gauge",
    "tollgate_token_fetch_consecutive_failures": "gauge",
    "tollgate_provider_awaiting_code": "gauge",
    "tollgate_token_unavailable_total": "counter",
    "tollgate_requests_total": "counter",
    "tollgate_upstream_duration_seconds": "histogram",
    "tollgate_config_reload_total": "counter",
    # Not in the interface draft; defined by src/metrics.rs (upstream 401s).
    "tollgate_upstream_auth_rejected_total": "counter",
}
# Families a running `tollgate demo` must expose once it holds a token and has
# proxied one request. The others only appear after the event they count
# (a token refused, a config reload, ...).
LIVE_REQUIRED = [
    "tollgate_build_info",
    "tollgate_token_fetch_total",
    "tollgate_token_fetch_duration_seconds",
    "tollgate_token_valid",
    "tollgate_token_fetch_consecutive_failures",
    "tollgate_provider_awaiting_code",
    "tollgate_requests_total",
    "tollgate_upstream_duration_seconds",
]

# Grafana's built-in variables, replaced by sample values before handing a
# dashboard query to promtool/Prometheus.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)


def finish() -> None:
    for p in problems:
        print(p)
    sys.exit(1 if problems else 0)


def load_yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_yaml(path: Path):
    docs = load_yaml_docs(path)
    if len(docs) != 1:
        raise SystemExit(f"{path}: expected one YAML document, found {len(docs)}")
    return docs[0]


DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")


def seconds(value) -> float:
    """'10s', '1m30s', '1500ms', 15 -> seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().replace(" ", "")
    pos, total = 0, 0.0
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    for m in DURATION_RE.finditer(text):
        if m.start() != pos:
            raise ValueError(f"bad duration {value!r}")
        total += float(m.group(1)) * unit[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"bad duration {value!r}")
    return total


def split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def secret_files(node, where="") -> list[tuple[str, str]]:
    """All `{ file = "..." }` secret references in a tollgate config, as (key, path)."""
    out = []
    if isinstance(node, dict):
        if set(node) == {"file"} and isinstance(node["file"], str):
            return [(where, node["file"])]
        for k, v in node.items():
            out += secret_files(v, f"{where}.{k}" if where else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += secret_files(v, f"{where}[{i}]")
    return out


def check_tollgate_config(cfg: dict, label: str) -> None:
    """What both example configs must satisfy."""
    for key in ("proxy", "admin", "providers", "routes"):
        if key not in cfg:
            problem(f"{label}: missing [{key}]")
    admin = cfg.get("admin", {})
    host, _ = split_hostport(admin.get("listen", "127.0.0.1:9090"))
    if not is_loopback(host) and "token" not in admin:
        problem(f"{label}: admin.listen {admin.get('listen')} is not loopback but admin.token is not set")
    try:
        seconds(cfg.get("proxy", {}).get("shutdown_timeout", "10s"))
    except ValueError as e:
        problem(f"{label}: proxy.shutdown_timeout: {e}")
    providers = cfg.get("providers", {})
    for r in cfg.get("routes", []):
        if r.get("provider") not in providers:
            problem(f"{label}: route {r.get('name')!r} names unknown provider {r.get('provider')!r}")
    for key, path in secret_files(cfg):
        if not path.startswith("/run/secrets/"):
            problem(f"{label}: {key} reads {path}, expected a file under /run/secrets/")


def placeholder(value: str, where: str) -> None:
    if "change-me" not in value:
        problem(f"{where}: value does not look like a placeholder (expected it to contain 'change-me')")


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------
def cmd_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # join continuation lines, drop comments
    logical, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in logical]
    froms = [a for i, a in instr if i == "FROM"]
    if len(froms) < 2:
        problem("Dockerfile: expected a multi-stage build (at least two FROM)")
    if froms and not re.match(r"rust:\S*bookworm\b", froms[0]):
        problem(f"Dockerfile: builder stage should be the official rust image on bookworm, got {froms[0]!r}")
    if froms and not re.match(r"(gcr\.io/distroless/cc-debian12:nonroot|debian:bookworm\S*-slim)\b", froms[-1]):
        problem(f"Dockerfile: runtime stage should be distroless cc-debian12:nonroot or debian slim, got {froms[-1]!r}")
    runs = " ".join(a for i, a in instr if i == "RUN")
    if not re.search(r"apt-get install [^&;]*\bcmake\b", runs):
        problem("Dockerfile: builder must apt-get install cmake (libz-ng-sys)")
    if "cargo build --release --locked" not in runs:
        problem("Dockerfile: builder must run `cargo build --release --locked`")
    # final stage only
    last_from = max(n for n, (i, _) in enumerate(instr) if i == "FROM")
    final = instr[last_from:]
    users = [a for i, a in final if i == "USER"]
    if not users:
        problem("Dockerfile: final stage sets no USER")
    elif users[-1].split(":")[0] in ("0", "root"):
        problem("Dockerfile: final stage runs as root")
    elif not users[-1].split(":")[0].isdigit():
        problem("Dockerfile: USER should be numeric so Kubernetes' runAsNonRoot can verify it")
    if any(i == "HEALTHCHECK" for i, _ in instr):
        problem("Dockerfile: no HEALTHCHECK wanted (probes belong to the orchestrator)")
    ep = [a for i, a in final if i == "ENTRYPOINT"]
    if not ep or json.loads(ep[-1]) != ["/usr/local/bin/tollgate"]:
        problem('Dockerfile: ENTRYPOINT must be ["/usr/local/bin/tollgate"]')
    cmd = [a for i, a in final if i == "CMD"]
    if not cmd or json.loads(cmd[-1]) != ["run", "--config", "/etc/tollgate/tollgate.toml"]:
        problem('Dockerfile: CMD must be ["run","--config","/etc/tollgate/tollgate.toml"]')
    labels = " ".join(a for i, a in final if i == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        if f"org.opencontainers.image.{key}=" not in labels:
            problem(f"Dockerfile: final stage lacks LABEL org.opencontainers.image.{key}")
    ignore = DEPLOY / "Dockerfile.dockerignore"
    if not ignore.exists():
        problem("deploy/Dockerfile.dockerignore missing")
    else:
        pats = {l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")}
        for must in ("target/", ".git/"):
            if must not in pats:
                problem(f"Dockerfile.dockerignore: should exclude {must}")
        for keep in ("src/", "Cargo.toml", "Cargo.lock"):
            if keep in pats or keep.rstrip("/") in pats:
                problem(f"Dockerfile.dockerignore: must not exclude {keep} (needed by cargo build)")
    finish()


# ---------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------
def compose_secret_targets(svc: dict) -> dict[str, str]:
    """A compose service's secrets as {path inside the container: secret name}."""
    out = {}
    for s in svc.get("secrets", []):
        name = s if isinstance(s, str) else s.get("source")
        target = (s.get("target") if isinstance(s, dict) else None) or name
        out[target if target.startswith("/") else "/run/secrets/" + target] = name
    return out


def port_specs(svc: dict) -> list[str]:
    """A service's published ports as `host_ip:published:target` strings."""
    return [p if isinstance(p, str) else f"{p.get('host_ip', '')}:{p.get('published')}:{p.get('target')}"
            for p in svc.get("ports", [])]


def pinned_image(image) -> bool:
    """name:tag with a tag other than latest, or a digest."""
    if not isinstance(image, str):
        return False
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def store_url(cfg: dict) -> tuple[str, int] | None:
    """Host and port of [store] url (redis:// or rediss://), if any."""
    m = re.fullmatch(r"rediss?://([^/:@]+)(?::(\d+))?(?:/\d*)?", str(cfg.get("store", {}).get("url", "")))
    return (m.group(1), int(m.group(2) or 6379)) if m else None


def without_store(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "store"}


def encryption_key_files(cfg: dict) -> set[str]:
    return {path for key, path in secret_files(cfg) if key.startswith("store.encryption_keys")}


def not_a_usable_key(value: str, where: str) -> None:
    """A committed placeholder for store.encryption_keys must not decode to a
    32-byte key: tollgate then refuses to start until it is replaced, so no
    deployment seals its tokens with a key published in this repository."""
    text = value.strip()
    for pad in ("", "=" * (-len(text) % 4)):
        try:
            if len(base64.b64decode(text + pad, validate=True)) == 32:
                problem(f"{where}: the placeholder is a valid 32-byte key; it must not be usable as is")
                return
        except ValueError:
            pass


def redis_server_config(svc_or_container_cmd) -> str:
    """The text of a Valkey/Redis start command (entrypoint/command/args joined)."""
    return "\n".join(str(x) for x in svc_or_container_cmd if x)


def check_redis_command(text: str, password_path: str, port: int, where: str) -> None:
    """requirepass read from the password file (not a literal), the port tollgate
    uses, and no persistence."""
    m = re.search(r"^\s*requirepass\s+(.*)$", text, re.M) or re.search(r"--requirepass\s+(\S+)", text)
    if not m:
        problem(f"{where}: no requirepass: the store would accept anyone on the network")
    elif password_path not in m.group(1) or "$(cat " not in m.group(1).replace("$$(", "$("):
        problem(f"{where}: requirepass must be read from {password_path} (the file tollgate's store.password reads)")
    if not re.search(rf"^\s*port\s+{port}\s*$", text, re.M) and f"--port {port}" not in text:
        problem(f"{where}: does not listen on port {port}, the port of tollgate's store.url")
    if not re.search(r'^\s*save\s+""\s*$', text, re.M) or not re.search(r"^\s*appendonly\s+no\s*$", text, re.M):
        problem(f"{where}: persistence should be off (save \"\", appendonly no): the store is a cache")


def check_compose(compose_name: str, toml_name: str, fleet: bool) -> None:
    cdir = DEPLOY / "compose"
    compose = load_yaml(cdir / compose_name)
    cfg = tomllib.loads((cdir / toml_name).read_text())
    check_tollgate_config(cfg, f"compose/{toml_name}")
    services = compose.get("services", {})
    tg = services.get("tollgate")
    if not tg:
        problem(f"{compose_name}: no `tollgate` service")
        return
    stores = {"redis"} if fleet else set()
    apps = [n for n in services if n != "tollgate" and n not in stores and "profiles" not in services[n]]
    if not apps:
        problem(f"{compose_name}: no application service next to tollgate")
    if tg.get("restart") != "unless-stopped":
        problem(f"{compose_name}: tollgate should have restart: unless-stopped")
    shutdown = seconds(cfg.get("proxy", {}).get("shutdown_timeout", "10s"))
    grace = seconds(tg.get("stop_grace_period", "10s"))
    if grace <= shutdown:
        problem(f"{compose_name}: stop_grace_period {grace:g}s must exceed proxy.shutdown_timeout {shutdown:g}s")
    # --config path and the config mount
    cmdline = tg.get("command") or ["run", "--config", "/etc/tollgate/tollgate.toml"]
    conf_path = cmdline[cmdline.index("--config") + 1] if "--config" in cmdline else None
    mounted = {c.get("target"): c.get("source") for c in tg.get("configs", []) if isinstance(c, dict)}
    mounted.update({v.split(":")[1]: v.split(":")[0] for v in tg.get("volumes", []) if isinstance(v, str) and ":" in v})
    if conf_path not in mounted:
        problem(f"{compose_name}: tollgate reads {conf_path} but nothing is mounted there")
    else:
        src = mounted[conf_path]
        top = compose.get("configs", {}).get(src, {})
        f = top.get("file", src)
        if not (cdir / f).resolve() == (cdir / toml_name).resolve():
            problem(f"{compose_name}: {conf_path} does not come from ./{toml_name}")
    # secrets: every file the config reads is a mounted compose secret with a placeholder file
    svc_secrets = compose_secret_targets(tg)
    top_secrets = compose.get("secrets", {})
    admin_token = cfg.get("admin", {}).get("token")
    admin_secret_name = svc_secrets.get(admin_token.get("file")) if isinstance(admin_token, dict) else None
    key_files = encryption_key_files(cfg)
    for key, path in secret_files(cfg):
        name = svc_secrets.get(path)
        if not name:
            problem(f"compose/{toml_name}: {key} reads {path}, which no compose secret of the tollgate service provides")
            continue
        spec = top_secrets.get(name)
        if not spec or "file" not in spec:
            problem(f"{compose_name}: secret {name} has no top-level file definition")
            continue
        fp = cdir / spec["file"]
        if not fp.is_file():
            problem(f"{compose_name}: secret file {spec['file']} missing")
        else:
            where = f"compose/{os.path.normpath(spec['file'])}"
            placeholder(fp.read_text(), where)
            if path in key_files:
                not_a_usable_key(fp.read_text(), where)
    for name, spec in top_secrets.items():
        if "environment" in spec:
            problem(f"{compose_name}: secret {name} comes from the environment; use files")
    # the app reaches the proxy port over the compose network
    phost, pport = split_hostport(cfg["proxy"]["listen"])
    if is_loopback(phost):
        problem(f"compose/{toml_name}: proxy.listen on loopback is unreachable from other containers")
    app_text = json.dumps([services[a] for a in apps])
    if f"http://tollgate:{pport}" not in app_text:
        problem(f"{compose_name}: the application does not call http://tollgate:{pport}")
    # optional Prometheus service: it must get the admin token where prometheus.yml reads it
    prom_svc = services.get("prometheus")
    if prom_svc:
        prom_cfg = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
        wanted = {j["authorization"]["credentials_file"] for j in prom_cfg.get("scrape_configs", [])
                  if "credentials_file" in j.get("authorization", {})}
        provided = compose_secret_targets(prom_svc)
        for path in wanted:
            if path not in provided:
                problem(f"{compose_name}: prometheus.yml reads {path}, which the prometheus service does not mount")
            elif admin_secret_name and provided[path] != admin_secret_name:
                problem(f"{compose_name}: prometheus gets secret {provided[path]} at {path}, tollgate's admin token is {admin_secret_name}")
        targets = [t for j in prom_cfg.get("scrape_configs", []) for sc in j.get("static_configs", []) for t in sc.get("targets", [])]
        admin_port = split_hostport(cfg["admin"]["listen"])[1]
        if f"tollgate:{admin_port}" not in targets:
            problem(f"prometheus.yml: no static target tollgate:{admin_port} for the compose example")
    # published ports: the host's loopback only, on every service
    for sname, svc in services.items():
        for spec in port_specs(svc):
            if not spec.startswith("127.0.0.1:"):
                problem(f"{compose_name}: {sname} port {spec} is published beyond the host's loopback")
    if fleet:
        check_compose_fleet(compose_name, toml_name, compose, cfg, services, tg, svc_secrets)


def check_compose_fleet(compose_name, toml_name, compose, cfg, services, tg, svc_secrets) -> None:
    """compose.fleet.yaml: N tollgate replicas on one Redis-compatible service."""
    base = tomllib.loads((DEPLOY / "compose" / "tollgate.toml").read_text())
    if without_store(cfg) != without_store(base):
        problem(f"compose/{toml_name}: differs from compose/tollgate.toml outside [store]")
    store = cfg.get("store", {})
    if store.get("kind") != "redis":
        problem(f"compose/{toml_name}: store.kind must be \"redis\"")
    if not store.get("encryption_keys"):
        problem(f"compose/{toml_name}: store.encryption_keys missing")
    hp = store_url(cfg)
    if not hp:
        problem(f"compose/{toml_name}: store.url is not redis://<service>:<port>/<db>")
        return
    host, port = hp
    redis = services.get(host)
    if not redis:
        problem(f"compose/{toml_name}: store.url names {host}, which is not a service of {compose_name}")
        return
    if "profiles" in redis:
        problem(f"{compose_name}: the {host} service must not sit behind a profile (tollgate needs it)")
    if not pinned_image(redis.get("image")):
        problem(f"{compose_name}: {host} image {redis.get('image')!r} is not pinned by tag")
    hc = redis.get("healthcheck", {})
    if not hc.get("test") or hc.get("disable"):
        problem(f"{compose_name}: {host} has no healthcheck")
    elif "ping" not in json.dumps(hc["test"]).lower():
        problem(f"{compose_name}: {host} healthcheck should PING the server (with the password)")
    # the password: one compose secret read by tollgate (store.password) and by the server
    pw = store.get("password")
    pw_path = pw.get("file") if isinstance(pw, dict) else None
    if not pw_path:
        problem(f"compose/{toml_name}: store.password must be a {{ file = ... }} secret")
    else:
        name = svc_secrets.get(pw_path)
        redis_targets = {v: k for k, v in compose_secret_targets(redis).items()}
        if name not in redis_targets:
            problem(f"{compose_name}: {host} does not mount secret {name}, the password tollgate sends")
        else:
            text = redis_server_config(list(redis.get("entrypoint") or []) + list(redis.get("command") or []))
            check_redis_command(text, redis_targets[name], port, f"{compose_name}: {host}")
    for e in (redis.get("environment") or {}):
        if "PASS" in str(e).upper():
            problem(f"{compose_name}: {host} takes a password from the environment; read the secret file")
    for spec in port_specs(redis):
        problem(f"{compose_name}: {host} publishes {spec}; only the tollgate replicas need it")
    if redis.get("read_only") is not True or "ALL" not in redis.get("cap_drop", []):
        problem(f"{compose_name}: {host} should be read_only with cap_drop ALL like tollgate")
    dep = tg.get("depends_on", {})
    if host not in dep:
        problem(f"{compose_name}: tollgate does not depend_on {host}")
    elif isinstance(dep, dict) and dep[host].get("condition") != "service_healthy":
        problem(f"{compose_name}: tollgate should wait for {host} to be healthy (one token request at cold start)")
    # replicas: one service scaled, or several tollgate-* services
    replicas = tg.get("deploy", {}).get("replicas", tg.get("scale", 1))
    if replicas < 2:
        problem(f"{compose_name}: tollgate runs {replicas} replica(s); the fleet example wants several")
    for spec in port_specs(tg):
        m = re.fullmatch(r"127\.0\.0\.1:(\d+)(?:-(\d+))?:(\d+)", spec)
        if not m:
            problem(f"{compose_name}: tollgate port {spec} is not 127.0.0.1:<host port or range>:<port>")
            continue
        width = int(m.group(2) or m.group(1)) - int(m.group(1)) + 1
        if width < replicas:
            problem(f"{compose_name}: tollgate publishes {spec} for {replicas} replicas; a host port range needs {replicas} ports")
    for v in tg.get("volumes", []):
        target = v.split(":")[1] if isinstance(v, str) and ":" in v else (v.get("target") if isinstance(v, dict) else None)
        if target == "/var/lib/tollgate":
            problem(f"{compose_name}: tollgate mounts a token-store volume; the fleet's store is Redis")


def cmd_compose() -> None:
    check_compose("compose.yaml", "tollgate.toml", fleet=False)
    check_compose("compose.fleet.yaml", "tollgate.fleet.toml", fleet=True)
    finish()


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------
# Strategic-merge keys of the lists the overlays patch (k8s.io/api patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name",
              "volumeMounts": "mountPath", "env": "name", "ports": "containerPort"}


def strategic_merge(base, patch):
    """Enough of Kubernetes' strategic merge patch for the overlays here: maps
    merge, lists of named objects merge by key (`$patch: delete` removes an
    entry), anything else is replaced. Lets the checks see an overlay without
    kustomize; check.sh hands them kustomize's own rendering when it can."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if k in MERGE_KEYS and isinstance(v, list) and isinstance(out.get(k), list):
            key = MERGE_KEYS[k]
            items = list(out[k])
            for p in v:
                idx = next((i for i, b in enumerate(items) if b.get(key) == p.get(key)), None)
                if p.get("$patch") == "delete":
                    if idx is not None:
                        items.pop(idx)
                elif idx is None:
                    items.append(p)
                else:
                    items[idx] = strategic_merge(items[idx], p)
            out[k] = items
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = strategic_merge(out[k], v)
        else:
            out[k] = v
    return out


def k8s_objects(directory: Path) -> list[dict]:
    """The objects a kustomization directory renders: its resources, with its
    strategic-merge patch files applied."""
    objs = []
    kust = load_yaml(directory / "kustomization.yaml")
    for res in kust.get("resources", []):
        p = directory / res
        if p.is_dir():
            objs += k8s_objects(p)
        elif p.is_file():
            objs += load_yaml_docs(p)
        else:
            problem(f"{directory.relative_to(DEPLOY)}/kustomization.yaml: resource {res} does not exist")
    for patch in kust.get("patches", []):
        if "path" not in patch:
            continue
        if not (directory / patch["path"]).is_file():
            problem(f"{directory.relative_to(DEPLOY)}/kustomization.yaml: patch {patch['path']} does not exist")
            continue
        for doc in load_yaml_docs(directory / patch["path"]):
            target = patch.get("target") or {}
            kind = target.get("kind", doc.get("kind"))
            name = target.get("name", doc.get("metadata", {}).get("name"))
            hits = [i for i, o in enumerate(objs) if o.get("kind") == kind and o["metadata"]["name"] == name]
            if not hits:
                problem(f"{directory.relative_to(DEPLOY)}/{patch['path']}: patches {kind}/{name}, which is not there")
            for i in hits:
                objs[i] = strategic_merge(objs[i], doc)
    return objs


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def restricted(sc: dict, pod_sc: dict, where: str) -> None:
    def get(key):
        return sc.get(key, pod_sc.get(key))
    if get("runAsNonRoot") is not True:
        problem(f"{where}: runAsNonRoot must be true")
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(f"{where}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(f"{where}: allowPrivilegeEscalation must be false")
    if "ALL" not in (sc.get("capabilities", {}) or {}).get("drop", []):
        problem(f"{where}: capabilities must drop ALL")
    if (get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem(f"{where}: seccompProfile must be RuntimeDefault")
    if get("runAsUser") == 0:
        problem(f"{where}: runAsUser 0")


def resolve_port(port, container) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def secret_key_at(vol: dict, filename: str) -> str | None:
    """The Secret key that a secret volume shows as `filename`."""
    items = vol.get("secret", {}).get("items")
    if items is None:
        return filename
    return next((it.get("key") for it in items if it.get("path") == filename), None)


def secret_behind(path: str, mounts: dict, volumes: dict) -> tuple[str, str] | None:
    """(Secret name, key) of a file under a secret volume mount, if it is one."""
    d, f = os.path.split(path)
    m = mounts.get(d)
    vol = volumes.get(m["name"], {}) if m else {}
    if "secret" not in vol:
        return None
    key = secret_key_at(vol, f)
    return (vol["secret"]["secretName"], key) if key else None


def check_pod_hardening(pod: dict, label: str, why_no_token: str) -> None:
    """Requests+limits and a restricted security context on every container,
    secrets never in the environment, no service account token."""
    pod_sc = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problem(f"{label}: container {c['name']} has no {kind}.{r}")
        restricted(c.get("securityContext", {}), pod_sc, f"{label}: container {c['name']} securityContext")
        for e in c.get("env", []):
            if "secretKeyRef" in (e.get("valueFrom") or {}):
                problem(f"{label}: container {c['name']} takes secret {e['name']} from env; mount it as a file")
        for e in c.get("envFrom", []):
            if "secretRef" in e:
                problem(f"{label}: container {c['name']} takes a Secret via envFrom; mount it as a file")
    if pod.get("automountServiceAccountToken") is not False:
        problem(f"{label}: automountServiceAccountToken should be false ({why_no_token})")


def check_tollgate_pod(dep: dict, cms: dict, secrets: dict, label: str, fleet: bool):
    """The app Deployment with its tollgate native sidecar. Returns (config,
    tollgate container, admin port), or None when there is no sidecar."""
    pod = dep["spec"]["template"]["spec"]
    tg = [c for c in pod.get("initContainers", []) if c.get("name") == "tollgate"]
    if not tg:
        problem(f"{label}: no initContainers entry named tollgate (native sidecar)")
        return None
    tg = tg[0]
    if tg.get("restartPolicy") != "Always":
        problem(f"{label}: tollgate initContainer needs restartPolicy: Always (native sidecar, 1.29+)")
    args = tg.get("args", [])
    conf_path = args[args.index("--config") + 1] if "--config" in args else "/etc/tollgate/tollgate.toml"
    if args[:1] != ["run"]:
        problem(f"{label}: tollgate args should start with `run`")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in tg.get("volumeMounts", [])}
    for m in tg.get("volumeMounts", []):
        if m["name"] not in volumes:
            problem(f"{label}: tollgate mounts volume {m['name']}, which the pod does not define")
    used = {m["name"] for c in pod.get("initContainers", []) + pod.get("containers", []) for m in c.get("volumeMounts", [])}
    for name in sorted(set(volumes) - used):
        problem(f"{label}: volume {name} is mounted by no container")
    # config: a ConfigMap mounted as a directory (no subPath: updates must propagate)
    conf_dir, conf_file = os.path.split(conf_path)
    m = mounts.get(conf_dir)
    cfg = None
    if not m or "configMap" not in volumes.get(m["name"], {}):
        problem(f"{label}: {conf_dir} is not a ConfigMap mount")
    else:
        if "subPath" in m:
            problem(f"{label}: config mounted with subPath never sees ConfigMap updates")
        cm = cms.get(volumes[m["name"]]["configMap"]["name"])
        if not cm or conf_file not in cm.get("data", {}):
            problem(f"{label}: ConfigMap has no key {conf_file}")
        else:
            cfg = tomllib.loads(cm["data"][conf_file])
            check_tollgate_config(cfg, f"{label} ConfigMap tollgate.toml")
    # secrets: files from Secret volumes, with placeholder values
    if cfg:
        key_files = encryption_key_files(cfg)
        for key, path in secret_files(cfg):
            behind = secret_behind(path, mounts, volumes)
            if not behind:
                problem(f"{label}: {key} reads {path} but it is not a file of a Secret mount")
                continue
            sname, skey = behind
            sec = secrets.get(sname)
            data = {**(sec or {}).get("stringData", {}), **(sec or {}).get("data", {})}
            if skey not in data:
                problem(f"{label}: Secret {sname} has no key {skey} (read by {key})")
            elif skey in sec.get("stringData", {}):
                placeholder(sec["stringData"][skey], f"{label} Secret {sname}/{skey}")
                if path in key_files:
                    not_a_usable_key(sec["stringData"][skey], f"{label} Secret {sname}/{skey}")
    # token store
    m = mounts.get("/var/lib/tollgate")
    store_is_emptydir = bool(m) and "emptyDir" in volumes.get(m["name"], {})
    if not fleet and not store_is_emptydir:
        problem(f"{label}: /var/lib/tollgate should be an emptyDir mount (token file store)")
    if fleet and store_is_emptydir:
        problem(f"{label}: /var/lib/tollgate is still an emptyDir; the fleet's tokens and logins live in Redis")
    # probes
    admin_port = split_hostport(cfg["admin"]["listen"])[1] if cfg else 9090
    want = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in want.items():
        p = tg.get(probe)
        if not p or "httpGet" not in p:
            problem(f"{label}: tollgate has no httpGet {probe}")
            continue
        if p["httpGet"].get("path") != path:
            problem(f"{label}: {probe} should GET {path}, not {p['httpGet'].get('path')}")
        if resolve_port(p["httpGet"].get("port"), tg) != admin_port:
            problem(f"{label}: {probe} port does not resolve to the admin port {admin_port}")
    if cfg:
        host, _ = split_hostport(cfg["admin"]["listen"])
        if is_loopback(host):
            problem(f"{label}: admin.listen on loopback cannot be probed by the kubelet")
        phost, pport = split_hostport(cfg["proxy"]["listen"])
        if not is_loopback(phost):
            problem(f"{label}: proxy.listen should be pod-local (127.0.0.1): anyone reaching it uses tollgate's credentials")
        apps_text = json.dumps(pod.get("containers", []))
        if f"127.0.0.1:{pport}" not in apps_text and f"localhost:{pport}" not in apps_text:
            problem(f"{label}: no app container calls the sidecar at 127.0.0.1:{pport}")
        # drain bound
        shutdown = seconds(cfg["proxy"].get("shutdown_timeout", "10s"))
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps <= shutdown:
            problem(f"{label}: terminationGracePeriodSeconds {tgps} must exceed proxy.shutdown_timeout {shutdown:g}s")
    check_pod_hardening(pod, label, "tollgate needs no API access")
    return cfg, tg, admin_port


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s_fleet(objs: list[dict], base_cfg: dict | None, label: str) -> None:
    """overlays/fleet: the app's replicas with their sidecars sharing one
    Redis-compatible Deployment behind a ClusterIP Service."""
    deps = by_kind(objs, "Deployment")
    cms = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in by_kind(objs, "Secret")}
    apps = [d for d in deps if any(c.get("name") == "tollgate" for c in d["spec"]["template"]["spec"].get("initContainers", []))]
    if len(apps) != 1:
        problem(f"{label}: expected one Deployment with the tollgate sidecar, found {len(apps)}")
        return
    app = apps[0]
    got = check_tollgate_pod(app, cms, secrets, label, fleet=True)
    if not got or not got[0]:
        return
    cfg, tg, _ = got
    if app["spec"].get("replicas", 1) < 2:
        problem(f"{label}: the app runs {app['spec'].get('replicas', 1)} replica(s); the fleet example wants several")
    if base_cfg is not None and without_store(cfg) != without_store(base_cfg):
        problem(f"{label}: tollgate.toml differs from the base's outside [store]")
    store = cfg.get("store", {})
    if store.get("kind") != "redis":
        problem(f"{label}: store.kind must be \"redis\"")
    if not store.get("encryption_keys"):
        problem(f"{label}: store.encryption_keys missing")
    hp = store_url(cfg)
    if not hp:
        problem(f"{label}: store.url is not redis://<service>:<port>/<db>")
        return
    host, port = hp
    svc = next((s for s in by_kind(objs, "Service") if s["metadata"]["name"] == host), None)
    if not svc:
        problem(f"{label}: store.url names {host}, which is not a Service of the overlay")
        return
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problem(f"{label}: Service {host} should be ClusterIP (the store is for the sidecars only)")
    sport = next((p for p in svc["spec"].get("ports", []) if p.get("port") == port), None)
    if not sport:
        problem(f"{label}: Service {host} has no port {port} (store.url)")
        return
    backends = [d for d in deps if selects(svc["spec"].get("selector", {}), d["spec"]["template"]["metadata"].get("labels", {}))]
    if len(backends) != 1 or backends[0] is app:
        problem(f"{label}: Service {host} should select exactly the store's Deployment, selects {len(backends)}")
        return
    rdep = backends[0]
    rname = rdep["metadata"]["name"]
    rpod = rdep["spec"]["template"]["spec"]
    if rdep["spec"].get("replicas", 1) != 1:
        problem(f"{label}: {rname} must run one replica: several would be separate stores behind one Service")
    if rdep["spec"].get("strategy", {}).get("type") != "Recreate":
        problem(f"{label}: {rname} should use strategy Recreate (a rolling update would split the fleet between two stores)")
    containers = rpod.get("containers", [])
    server = next((c for c in containers if resolve_port(sport.get("targetPort", port), c) is not None), None)
    if not server:
        problem(f"{label}: Service {host} targetPort {sport.get('targetPort')} is no container port of {rname}")
        return
    if not pinned_image(server.get("image")):
        problem(f"{label}: {rname} image {server.get('image')!r} is not pinned by tag")
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in server:
            problem(f"{label}: {rname} has no {probe}")
    check_pod_hardening(rpod, f"{label} {rname}", "the store needs no API access")
    # requirepass from the same Secret key that tollgate sends as store.password
    pw = store.get("password")
    pw_path = pw.get("file") if isinstance(pw, dict) else None
    tg_volumes = {v["name"]: v for v in app["spec"]["template"]["spec"].get("volumes", [])}
    tg_mounts = {m["mountPath"]: m for m in tg.get("volumeMounts", [])}
    behind = secret_behind(pw_path, tg_mounts, tg_volumes) if pw_path else None
    if not behind:
        problem(f"{label}: store.password must be a file from a Secret")
        return
    r_volumes = {v["name"]: v for v in rpod.get("volumes", [])}
    r_path = None
    for m in server.get("volumeMounts", []):
        vol = r_volumes.get(m["name"], {})
        if vol.get("secret", {}).get("secretName") != behind[0]:
            continue
        items = vol["secret"].get("items")
        fname = behind[1] if items is None else next((it["path"] for it in items if it.get("key") == behind[1]), None)
        if fname:
            r_path = f"{m['mountPath'].rstrip('/')}/{fname}"
    if not r_path:
        problem(f"{label}: {rname} does not mount Secret {behind[0]} key {behind[1]}, the password tollgate sends")
    else:
        text = redis_server_config(list(server.get("command") or []) + list(server.get("args") or []))
        check_redis_command(text, r_path, resolve_port(sport.get("targetPort", port), server), f"{label}: {rname}")
        for m in server.get("volumeMounts", []):
            vol = r_volumes.get(m["name"], {})
            if vol.get("secret", {}).get("secretName") == behind[0] and vol["secret"].get("items") is None:
                problem(f"{label}: {rname} mounts all of Secret {behind[0]}; list only the password (items)")
    # only the sidecars may connect
    app_labels = app["spec"]["template"]["metadata"].get("labels", {})
    r_labels = rdep["spec"]["template"]["metadata"].get("labels", {})
    allowed = False
    for np in by_kind(objs, "NetworkPolicy"):
        spec = np.get("spec", {})
        if not selects(spec.get("podSelector", {}).get("matchLabels", {}), r_labels):
            continue
        for rule in spec.get("ingress", []):
            froms = [f.get("podSelector", {}).get("matchLabels", {}) for f in rule.get("from", [])]
            ports = [p.get("port") for p in rule.get("ports", [])]
            if any(selects(f, app_labels) for f in froms) and (not ports or any(resolve_port(p, server) == resolve_port(sport.get("targetPort", port), server) for p in ports)):
                allowed = True
    if not allowed:
        problem(f"{label}: no NetworkPolicy limits {rname} to the tollgate pods (labels {app_labels})")


def cmd_k8s(fleet_rendered: str | None = None) -> None:
    kdir = DEPLOY / "k8s"
    objs = k8s_objects(kdir)
    deps = by_kind(objs, "Deployment")
    cms = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o for o in by_kind(objs, "Secret")}
    if len(deps) != 1:
        problem(f"k8s: expected one Deployment, found {len(deps)}")
        finish()
    dep = deps[0]
    got = check_tollgate_pod(dep, cms, secrets, "k8s", fleet=False)
    if not got:
        finish()
    cfg, tg, admin_port = got
    labels = dep["spec"]["template"]["metadata"].get("labels", {})

    # fleet overlay: kustomize's rendering when check.sh has one, else ours
    fleet_dir = kdir / "overlays" / "fleet"
    fleet_objs = load_yaml_docs(Path(fleet_rendered)) if fleet_rendered else k8s_objects(fleet_dir)
    check_k8s_fleet(fleet_objs, cfg, "k8s overlays/fleet")

    # PodMonitor overlay
    pm_dir = kdir / "overlays" / "podmonitor"
    pm_objs = k8s_objects(pm_dir)
    pms = by_kind(pm_objs, "PodMonitor")
    if len(pms) != 1:
        problem(f"k8s overlays/podmonitor: expected one PodMonitor, found {len(pms)}")
    for pm in pms:
        if pm.get("apiVersion") != "monitoring.coreos.com/v1":
            problem("PodMonitor: apiVersion must be monitoring.coreos.com/v1")
        if not pm.get("metadata", {}).get("name"):
            problem("PodMonitor: metadata.name missing")
        spec = pm.get("spec", {})
        sel = spec.get("selector", {}).get("matchLabels", {})
        if not sel or any(labels.get(k) != v for k, v in sel.items()):
            problem(f"PodMonitor: selector {sel} does not match the pod labels {labels}")
        eps = spec.get("podMetricsEndpoints", [])
        if not eps:
            problem("PodMonitor: spec.podMetricsEndpoints is empty")
        for ep in eps:
            if resolve_port(ep.get("port"), tg) != admin_port and ep.get("portNumber") != admin_port:
                problem(f"PodMonitor: endpoint port {ep.get('port')} is not tollgate's admin port")
            if ep.get("path", "/metrics") != "/metrics":
                problem("PodMonitor: path should be /metrics")
            auth = ep.get("authorization", {})
            cred = auth.get("credentials", {})
            if auth.get("type", "Bearer") != "Bearer" or not cred:
                problem("PodMonitor: /metrics needs the admin bearer token (authorization.credentials)")
            else:
                sec = secrets.get(cred.get("name"))
                if not sec:
                    problem(f"PodMonitor: credentials Secret {cred.get('name')} is not part of the base")
                elif cred.get("key") not in {**sec.get("stringData", {}), **sec.get("data", {})}:
                    problem(f"PodMonitor: Secret {cred.get('name')} has no key {cred.get('key')}")
                elif cfg and secret_files(cfg) and cred.get("key") != os.path.basename(cfg["admin"]["token"].get("file", "")):
                    problem("PodMonitor: credentials key differs from the file tollgate reads its admin token from")
            for field in ("interval", "scrapeTimeout"):
                if field in ep:
                    seconds(ep[field])

    # scrape-annotation overlay <-> prometheus-kubernetes.yml
    sa_dir = kdir / "overlays" / "scrape-annotations"
    k8s_objects(sa_dir)
    kust = load_yaml(sa_dir / "kustomization.yaml")
    ann = {}
    for patch in kust.get("patches", []):
        doc = load_yaml(sa_dir / patch["path"])
        ann.update(doc["spec"]["template"]["metadata"].get("annotations", {}))
    if ann.get("prometheus.io/scrape") != "true":
        problem("scrape-annotations: prometheus.io/scrape must be \"true\"")
    if ann.get("prometheus.io/port") != str(admin_port):
        problem(f"scrape-annotations: prometheus.io/port should be the admin port {admin_port}")
    if ann.get("prometheus.io/path", "/metrics") != "/metrics":
        problem("scrape-annotations: prometheus.io/path should be /metrics")
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus-kubernetes.yml")
    jobs = [j for j in prom.get("scrape_configs", []) if j.get("kubernetes_sd_configs")]
    if not jobs:
        problem("prometheus-kubernetes.yml: no kubernetes_sd job")
    for j in jobs:
        keeps = {tuple(r.get("source_labels", [])): r.get("regex") for r in j.get("relabel_configs", []) if r.get("action") == "keep"}
        if keeps.get(("__meta_kubernetes_pod_container_name",)) != tg["name"]:
            problem(f"prometheus-kubernetes.yml: job {j['job_name']} must keep only container {tg['name']!r} (it sends the admin token)")
        port_names = [p.get("name") for p in tg.get("ports", [])]
        if keeps.get(("__meta_kubernetes_pod_container_port_name",)) not in port_names:
            problem(f"prometheus-kubernetes.yml: job {j['job_name']} keeps a port name tollgate does not declare")
        if "authorization" not in j:
            problem(f"prometheus-kubernetes.yml: job {j['job_name']} sends no admin bearer token")
    finish()


# ---------------------------------------------------------------------------
# Prometheus rules and Grafana dashboard
# ---------------------------------------------------------------------------
METRIC_TOKEN_RE = re.compile(r"\btollgate_[a-zA-Z0-9_]+")


def family_of(name: str) -> str | None:
    if name in METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[: -len(suffix)] if name.endswith(suffix) else None
        if base and METRICS.get(base) == "histogram":
            return base
    return None


def check_names(expr: str, where: str) -> None:
    for name in METRIC_TOKEN_RE.findall(expr):
        if not family_of(name):
            problem(f"{where}: {name} is not a metric of tollgate's interface")


def cmd_alerts() -> None:
    rules = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    tests = load_yaml(DEPLOY / "prometheus" / "alerts_test.yml")
    fired = {t.get("alertname") for test in tests.get("tests", []) for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    quiet = {t.get("alertname") for test in tests.get("tests", []) for t in test.get("alert_rule_test", []) if not t.get("exp_alerts")}
    for g in rules.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            check_names(r.get("expr", ""), f"alerts.yml {name}")
            if "alert" in r:
                if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                    problem(f"alerts.yml {name}: severity label missing or unusual")
                for a in ("summary", "description"):
                    if not r.get("annotations", {}).get(a):
                        problem(f"alerts.yml {name}: annotation {a} missing")
                if name not in fired:
                    problem(f"alerts.yml {name}: alerts_test.yml has no case where it fires")
                if name not in quiet:
                    problem(f"alerts.yml {name}: alerts_test.yml has no case where it stays quiet")
    finish()


def grafana_vars(dash) -> set[str]:
    return {v["name"] for v in dash.get("templating", {}).get("list", [])}


def substitute(expr: str, names: set[str]) -> str:
    """Replace Grafana variables by values promtool/Prometheus accept."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        return ".*"  # multi-value/all variables are only used inside =~ matchers
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def dashboard_exprs(dash) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") == "query" and isinstance(q, str):
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
            if m:
                out.append((f"variable {v['name']}", m.group(1)))
            elif not q.startswith(("label_names", "metrics(")):
                out.append((f"variable {v['name']}", q))
    return out


def cmd_dashboard() -> None:
    path = DEPLOY / "grafana" / "tollgate-dashboard.json"
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problem(f"{path.name}: invalid JSON: {e}")
        finish()
    for key in ("title", "uid", "schemaVersion", "panels", "templating"):
        if key not in dash:
            problem(f"dashboard: missing {key}")
    if dash.get("id") not in (None,):
        problem("dashboard: a shared dashboard should have id null/absent (Grafana assigns it)")
    names = grafana_vars(dash)
    if "datasource" not in names:
        problem("dashboard: no datasource variable; imports would be tied to one data source uid")
    ids, cells = set(), {}
    def walk(panels):
        for p in panels:
            if p.get("id") in ids:
                problem(f"dashboard: duplicate panel id {p.get('id')}")
            ids.add(p.get("id"))
            gp = p.get("gridPos", {})
            if not all(k in gp for k in "xywh"):
                problem(f"dashboard: panel {p.get('id')} has no complete gridPos")
            elif gp["x"] + gp["w"] > 24:
                problem(f"dashboard: panel {p.get('id')} is wider than the grid")
            else:
                for x in range(gp["x"], gp["x"] + gp["w"]):
                    for y in range(gp["y"], gp["y"] + gp["h"]):
                        if (x, y) in cells:
                            problem(f"dashboard: panels {cells[(x, y)]} and {p.get('id')} overlap")
                            break
                        cells[(x, y)] = p.get("id")
            if p.get("type") != "row":
                ds = p.get("datasource", {})
                if ds.get("uid") != "${datasource}":
                    problem(f"dashboard: panel {p.get('id')} does not use the ${{datasource}} variable")
                if not p.get("targets"):
                    problem(f"dashboard: panel {p.get('id')} has no query")
            walk(p.get("panels", []))
    walk(dash.get("panels", []))
    exprs = dashboard_exprs(dash)
    used = set()
    for where, expr in exprs:
        check_names(expr, f"dashboard {where}")
        for m in re.finditer(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", expr):
            n = m.group(1) or m.group(2) or m.group(3)
            if n not in names and n not in GRAFANA_BUILTINS:
                problem(f"dashboard {where}: uses undefined variable ${n}")
    referenced = {family_of(n) for _, e in exprs for n in METRIC_TOKEN_RE.findall(e)}
    want = {"tollgate_token_valid", "tollgate_token_expiry_timestamp_seconds", "tollgate_token_fetch_total",
            "tollgate_requests_total", "tollgate_upstream_duration_seconds"}
    for w in sorted(want - referenced):
        problem(f"dashboard: no panel shows {w}")
    if not any("histogram_quantile(0.5" in e and "upstream" in e for _, e in exprs) or \
       not any("histogram_quantile(0.99" in e and "upstream" in e for _, e in exprs):
        problem("dashboard: upstream latency p50 and p99 panels missing")
    finish()


def cmd_dashboard_rules(out: str) -> None:
    """Write every dashboard query as a recording rule, for `promtool check rules`."""
    dash = json.loads((DEPLOY / "grafana" / "tollgate-dashboard.json").read_text())
    names = grafana_vars(dash)
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(e, names),
              "labels": {"origin": w[:60]}} for i, (w, e) in enumerate(dashboard_exprs(dash))]
    Path(out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))


def cmd_dashboard_queries() -> None:
    """Print `<where>\\t<expr>` for every dashboard query, variables substituted."""
    dash = json.loads((DEPLOY / "grafana" / "tollgate-dashboard.json").read_text())
    names = grafana_vars(dash)
    for where, e in dashboard_exprs(dash):
        print(f"{where}\t{' '.join(substitute(e, names).split())}")


# ---------------------------------------------------------------------------
# Live helpers
# ---------------------------------------------------------------------------
LOOPBACK_URL_RE = re.compile(r'"(https?)://(?!127\.|localhost|\[::1\])([^/:"]+)(:\d+)?')


def example_configs() -> dict[str, str]:
    """The example configs' TOML text, by a short name."""
    texts = {
        "compose.toml": (DEPLOY / "compose" / "tollgate.toml").read_text(),
        "compose-fleet.toml": (DEPLOY / "compose" / "tollgate.fleet.toml").read_text(),
    }
    for o in load_yaml_docs(DEPLOY / "k8s" / "base" / "configmap.yaml"):
        texts["k8s.toml"] = o["data"]["tollgate.toml"]
    for o in load_yaml_docs(DEPLOY / "k8s" / "overlays" / "fleet" / "configmap-fleet.yaml"):
        texts["k8s-fleet.toml"] = o["data"]["tollgate.toml"]
    return texts


def write_config(out: Path, name: str, text: str, secret_value) -> Path:
    """Write `text` to out/name with every secret file redirected to a local
    file holding secret_value(key, path), and URL hosts mapped to 127.0.0.1."""
    for key, path in secret_files(tomllib.loads(text)):
        local = out / "secrets" / name.rsplit(".", 1)[0] / path.lstrip("/").replace("/", "_")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(secret_value(key, path))
        local.chmod(0o600)
        text = text.replace(f'"{path}"', json.dumps(str(local)))
    text = LOOPBACK_URL_RE.sub(lambda m: f'"{m.group(1)}://127.0.0.1{m.group(3) or ""}', text)
    (out / name).write_text(text)
    return out / name


def cmd_configs(outdir: str) -> None:
    """Write the compose and k8s example configs (single and fleet) with their
    secret files redirected into outdir, for `tollgate check`: placeholder text,
    except a freshly generated 32-byte base64 key for store.encryption_keys.
    URL hosts are mapped to 127.0.0.1: `tollgate check` resolves upstream
    hosts, and the check must not depend on (or send queries to) outside DNS.
    (The redis:// store URL is only parsed by `tollgate check`, never dialled.)"""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    def value(key: str, _path: str) -> str:
        if key.startswith("store.encryption_keys"):
            return base64.b64encode(os.urandom(32)).decode() + "\n"
        return "change-me-placeholder\n"
    for name, text in example_configs().items():
        print(write_config(out, name, text, value))


def cmd_placeholder_key_config(outdir: str) -> None:
    """Write the compose fleet config with the committed placeholder secrets
    themselves (secrets/store-key as it is in the repository), for a check that
    tollgate refuses to start with the placeholder key."""
    cdir = DEPLOY / "compose"
    compose = load_yaml(cdir / "compose.fleet.yaml")
    targets = compose_secret_targets(compose["services"]["tollgate"])

    def value(_key: str, path: str) -> str:
        return (cdir / compose["secrets"][targets[path]]["file"]).read_text()
    print(write_config(Path(outdir), "compose-fleet-placeholders.toml", example_configs()["compose-fleet.toml"], value))


def parse_exposition(text: str) -> dict[str, dict]:
    fams: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            fams.setdefault(name, {"type": typ, "samples": []})["type"] = typ
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
            fam = family_of(name) or name
            fams.setdefault(fam, {"type": None, "samples": []})["samples"].append(line)
    return fams


def cmd_exposition(path: str) -> None:
    """Compare a live /metrics body with the interface."""
    fams = parse_exposition(Path(path).read_text())
    exposed = {n for n in fams if n.startswith("tollgate_")}
    for n in sorted(exposed):
        if n not in METRICS:
            continue  # new metrics are fine (check.sh notes them); renamed ones show up as missing below
        if fams[n]["type"] and fams[n]["type"] != METRICS[n]:
            problem(f"/metrics: {n} has type {fams[n]['type']}, interface says {METRICS[n]}")
    for n in LIVE_REQUIRED:
        if n not in exposed or not fams[n]["samples"]:
            problem(f"/metrics: {n} missing after the demo obtained a token and proxied a request")
    bi = fams.get("tollgate_build_info", {}).get("samples", [])
    if bi and not any('version="' in s for s in bi):
        problem("/metrics: tollgate_build_info has no version label")
    finish()


def cmd_missing_families(path: str) -> None:
    """Print interface families absent from a live /metrics body (informational)."""
    fams = parse_exposition(Path(path).read_text())
    print(" ".join(sorted(n for n in METRICS if n not in fams)))


def cmd_unknown_families(path: str) -> None:
    """Print tollgate_* families in a live /metrics body that deploy/ does not know."""
    fams = parse_exposition(Path(path).read_text())
    print(" ".join(sorted(n for n in fams if n.startswith("tollgate_") and n not in METRICS)))


def cmd_rules_health(path: str) -> None:
    """A live Prometheus' /api/v1/rules answer: every rule evaluated ok, none firing."""
    try:
        d = json.loads(Path(path).read_text())
        rules = [r for g in d["data"]["groups"] for r in g["rules"]]
    except (ValueError, KeyError, OSError) as e:
        problem(f"/api/v1/rules: unusable answer ({e})")
        finish()
    if not rules:
        problem("/api/v1/rules: no rules loaded")
    for r in rules:
        if r.get("health") != "ok":
            problem(f"rule {r.get('name')}: health {r.get('health')!r} {r.get('lastError', '')}")
        if r.get("state") == "firing":
            problem(f"rule {r.get('name')}: firing against a healthy demo")
    finish()


def main() -> None:
    cmds = {
        "dockerfile": cmd_dockerfile,
        "compose": cmd_compose,
        "k8s": cmd_k8s,
        "alerts": cmd_alerts,
        "dashboard": cmd_dashboard,
        "dashboard-rules": cmd_dashboard_rules,
        "dashboard-queries": cmd_dashboard_queries,
        "configs": cmd_configs,
        "placeholder-key-config": cmd_placeholder_key_config,
        "exposition": cmd_exposition,
        "missing-families": cmd_missing_families,
        "unknown-families": cmd_unknown_families,
        "rules-health": cmd_rules_health,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        raise SystemExit(f"usage: {sys.argv[0]} {{{'|'.join(cmds)}}} [args]")
    try:
        cmds[sys.argv[1]](*sys.argv[2:])
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        print(f"{sys.argv[1]}: {type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
