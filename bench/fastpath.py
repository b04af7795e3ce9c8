#!/usr/bin/env python3
"""Fast path benchmark, issue 13 (driven by bench/fastpath.sh; see bench/README.md, "Fast path").

Side by side in one run, each proxy with one worker thread, pinned to core 0 with the
upstream nginx (wrk on core 1), an 814-byte `Authorization` header injected:

    nginx proxy | HAProxy | bare pingora (examples/bare_proxy.rs) |
    tollgate, proxy.fast_path = false | tollgate, proxy.fast_path = true

against a plain-HTTP upstream and a TLS upstream (the same nginx worker, a second
listener with a certificate generated at run time). What it measures:

1. CPU µs per request: utime+stime of the proxy process (`/proc/<pid>/stat`) over a
   `wrk -t1 -cC -dDs` step ÷ requests completed, C = 64 and 256; interleaved rounds,
   idle-machine waits and noise repeats from harness.py (`harness.Bench.main_rounds`).
2. Peak RSS: VmHWM of each proxy process after the rounds.
3. For the tollgate targets, `tollgate_fastpath_total` and `tollgate_requests_total` from
   /metrics, so a reader sees which path served the requests.
4. Instructions per request under `valgrind --tool=callgrind`, the method of
   fleet.py (and the prototype's callgrind script) applied to every target: the target restarted under
   valgrind (nginx with `master_process off`, so one process does the work), a warm-up,
   an idle window, then N GETs on one keep-alive connection; instructions of the whole
   process between `callgrind_control -z` and `-d`, gross and net of the idle rate.

Everything on 127.0.0.1 on free ports; every step is bounded in time or request count.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True  # no bench/__pycache__ from importing harness
import harness  # noqa: E402  (Bench: rounds, steps, noise; spawn, render, wrk, /proc sampling)
import fleet  # noqa: E402  (free_ports, /metrics, callgrind window, keep-alive client, noise line)
from harness import AUTH_VALUE, PROXY_CORE, LOAD_CORE, TOKEN, log  # noqa: E402
from report import f as fmt, machine_section, med, rng as _rng  # noqa: E402


def rng(xs, nd=0):
    """median (min–max) over rounds; a lone value as itself."""
    xs = [x for x in xs if x is not None]
    return fmt(xs[0], nd) if len(xs) == 1 else _rng(xs, nd)

KINDS = ("nginx", "haproxy", "bare", "tg-off", "tg-on")
KIND_NAMES = {
    "nginx": "nginx proxy",
    "haproxy": "HAProxy",
    "bare": "bare pingora",
    "tg-off": "tollgate, fast_path = false",
    "tg-on": "tollgate, fast_path = true",
}
UPSTREAMS = ("plain", "tls")
SNI = "upstream.bench.test"
# The knob examples/bare_proxy.rs needs for a TLS HttpPeer (see bench/README.md). The
# bare pingora TLS target runs only when the example's source mentions it.
BARE_TLS_KNOB = "BARE_PROXY_TLS_SNI"

# Issue 13's goals.
GOAL_CPU_VS_NGINX = 1.0  # plain upstream: tollgate fast path CPU/request <= nginx's
GOAL_INSTRUCTIONS = 25_000  # user-space instructions per request (callgrind), fast path
GOAL_TLS_VS_NGINX = 1.10  # TLS upstream: within 10 % of nginx with proxy_ssl + keep-alive


def kind_of(t):
    return t[:-4] if t.endswith("-tls") else t


def is_tls(t):
    return t.endswith("-tls")


def name_of(t):
    return KIND_NAMES[kind_of(t)] + (", TLS upstream" if is_tls(t) else "")


def fastpath_counters(admin_port):
    """{"path/reason": count} of tollgate_fastpath_total, and the sum of tollgate_requests_total."""
    text = fleet.metrics_text(admin_port)
    fp = {}
    for line in text.splitlines():
        if not line.startswith("tollgate_fastpath_total{"):
            continue
        series, _, value = line.rpartition(" ")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
        try:
            fp[f"{labels.get('path', '?')}/{labels.get('reason', '?')}"] = float(value)
        except ValueError:
            pass
    return {"fastpath_total": fp, "requests_total": fleet.metric_sum(text, "tollgate_requests_total")}


def safe_counters(admin_port):
    """fastpath_counters, or None when the target no longer answers (reported, not fatal)."""
    try:
        return fastpath_counters(admin_port)
    except Exception as e:  # noqa: BLE001
        log(f"/metrics on :{admin_port} unreadable: {e}")
        return None


def counters_delta(before, after):
    if not before or not after:
        return None
    keys = set(before["fastpath_total"]) | set(after["fastpath_total"])
    return {
        "fastpath_total": {k: after["fastpath_total"].get(k, 0) - before["fastpath_total"].get(k, 0) for k in sorted(keys)},
        "requests_total": after["requests_total"] - before["requests_total"],
    }


def make_certs(work):
    """A throwaway CA and a leaf for SNI and 127.0.0.1 (EC P-256), valid 2 days; paths."""
    d = os.path.join(work, "tls")
    os.makedirs(d, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (os.path.join(d, n) for n in
                                       ("ca.key", "ca.pem", "up.key", "up.csr", "up.pem", "up.ext"))
    with open(ext, "w") as f:
        f.write(f"subjectAltName=DNS:{SNI},IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=tollgate bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={SNI}"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return {"ca": ca, "cert": cert, "key": key}


class FastBench(harness.Bench):
    """harness.Bench with this benchmark's targets; its main_rounds, step, wait_quiet and
    Sampler are used unchanged."""

    def __init__(self, a):
        super().__init__(a)
        self.data["params"].update({
            "callgrind_requests": a.callgrind, "callgrind_warmup": a.callgrind_warmup,
            "callgrind_idle_s": a.callgrind_idle, "callgrind_targets": a.callgrind_targets,
            "quick": a.quick, "sni": SNI, "step_warmup_s": a.step_warmup,
        })
        self.data["skipped"] = dict(a.skipped)
        names = ["UP", "IDP", "UP_TLS"] + list(a.targets) + [t + "_admin" for t in a.targets if kind_of(t).startswith("tg-")]
        self.ports = dict(zip(names, fleet.free_ports(len(names))))
        # harness.Bench.start_upstream's nginx and its stub_status counter live at these.
        harness.PORTS.update(UP=self.ports["UP"], IDP=self.ports["IDP"])
        self.procs = {}
        self.fastpath = {}

    # -- processes ------------------------------------------------------------------

    def start_upstream(self):
        self.certs = make_certs(self.work)
        conf = harness.render("nginx-upstream.conf", os.path.join(self.work, "nginx-upstream.conf"),
                              WORK=self.work, TOKEN=TOKEN, UP_PORT=self.ports["UP"], IDP_PORT=self.ports["IDP"])
        frag = harness.render("fastpath-upstream-tls.conf", os.path.join(self.work, "upstream-tls.frag"),
                              TLS_PORT=self.ports["UP_TLS"], CERT=self.certs["cert"], KEY=self.certs["key"])
        with open(conf) as f:
            text = f.read().rstrip()
        with open(frag) as f:
            block = f.read()
        if not text.endswith("}"):
            raise SystemExit("bench/conf/nginx-upstream.conf no longer ends with the http block's `}`")
        with open(conf, "w") as f:
            f.write(text[:-1] + block + "}\n")
        p = harness.spawn("nginx-upstream", ["nginx", "-p", self.work, "-c", conf], self.work)
        for port in (self.ports["UP"], self.ports["UP_TLS"]):
            harness.wait_port(port, proc=p)
        self.up_master = p.pid
        self.up_worker = harness.worker_pid(p.pid)
        log(f"upstream nginx worker {self.up_worker}: plain :{self.ports['UP']}, TLS :{self.ports['UP_TLS']}, "
            f"token endpoint :{self.ports['IDP']}")

    def spawn_target(self, t, port, admin, prefix=(), name=None, callgrind=False, ready_timeout=30):
        """Start target t listening on `port`; (Popen, pid of the process doing the work)."""
        kind, tls = kind_of(t), is_tls(t)
        name = name or t
        up_addr = f"127.0.0.1:{self.ports['UP_TLS'] if tls else self.ports['UP']}"
        prefix = list(prefix)
        if kind == "nginx":
            conf = harness.render("fastpath-nginx-proxy.conf", os.path.join(self.work, f"{name}.conf"),
                                  WORK=self.work, NAME=name, TOKEN=TOKEN, UP_ADDR=up_addr, PORT=port,
                                  SCHEME="https" if tls else "http", MASTER="off" if callgrind else "on")
            p = harness.spawn(name, prefix + ["nginx", "-p", self.work, "-c", conf], self.work)
            harness.wait_port(port, timeout=ready_timeout, proc=p)
            if callgrind:
                return p, p.pid
            self.data["pids"][t + "_master"] = p.pid
            return p, harness.worker_pid(p.pid)
        if kind == "haproxy":
            conf = harness.render("fastpath-haproxy.cfg", os.path.join(self.work, f"{name}.cfg"),
                                  WORK=self.work, NAME=name, TOKEN=TOKEN, UP_ADDR=up_addr, PORT=port,
                                  SERVER_OPTS="ssl verify none" if tls else "",
                                  MAXCONN=1000 if callgrind else 9000)
            p = harness.spawn(name, prefix + ["haproxy", "-db", "-f", conf], self.work)
            harness.wait_port(port, timeout=ready_timeout, proc=p)
            return p, p.pid
        if kind == "bare":
            env = {"BARE_PROXY_AUTH": AUTH_VALUE, "BARE_PROXY_POOL_SIZE": "1024"}
            if tls:
                env[BARE_TLS_KNOB] = SNI
            p = harness.spawn(name, prefix + [self.a.bare_proxy, f"127.0.0.1:{port}", up_addr], self.work, env=env)
            harness.wait_port(port, timeout=ready_timeout, proc=p)
            return p, p.pid
        # tollgate
        route_tls = f'ca_file = "{self.certs["ca"]}"\nsni = "{SNI}"\n' if tls else ""
        conf = harness.render("fastpath-tollgate.toml", os.path.join(self.work, f"{name}.toml"),
                              PORT=port, ADMIN_PORT=admin, IDP_PORT=self.ports["IDP"],
                              FAST_PATH="true" if kind == "tg-on" else "false",
                              UPSTREAM=f"{'https' if tls else 'http'}://{up_addr}", ROUTE_TLS=route_tls)
        p = harness.spawn(name, prefix + [self.a.tollgate, "run", "--config", conf], self.work,
                          env={"TOLLGATE_LOG": os.environ.get("BENCH_TOLLGATE_LOG", "warn")})
        harness.wait_port(port, timeout=ready_timeout, proc=p)
        harness.wait_http_200(f"http://127.0.0.1:{admin}/readyz", timeout=ready_timeout)
        return p, p.pid

    def start_target(self, t):
        if t in self.procs:  # started (and checked) before the rounds; see run()
            return
        p, pid = self.spawn_target(t, self.ports[t], self.ports.get(t + "_admin"))
        self.procs[t] = p
        self.pids[t] = pid
        self.data["pids"][t] = pid
        log(f"target {t} ({name_of(t)}) pid {pid} on :{self.ports[t]}")

    def port(self, t):
        return self.ports[t]

    def step(self, t, rnd, kind, fn):
        """harness.Bench.step after an unmeasured wrk of `--step-warmup` s at the same
        concurrency: each proxy's idle upstream pool is refilled right before it is measured
        (tollgate closes idle upstream connections after 50 s, HAProxy purges them from 5 s
        on, and other targets run in between), so every target is measured in its keep-alive
        steady state and new upstream connections (TLS handshakes) stay out of the figures."""
        if self.a.step_warmup > 0 and kind.startswith("wrk"):
            harness.run_wrk(self.port(t), int(kind[3:]), self.a.step_warmup)
        return super().step(t, rnd, kind, fn)

    def sanity(self, t, port=None, timeout=30):
        """The upstream received the exact header; the body is the upstream's; a TLS target
        reached the TLS listener (it echoes the protocol it negotiated)."""
        port = port or self.port(t)
        st, body = harness.http_get_retrying(f"http://127.0.0.1:{port}/__auth", timeout)
        if st != 200 or body != AUTH_VALUE.encode():
            raise RuntimeError(f"target {t}: the upstream saw Authorization {body[:40]!r}… (len {len(body)}), "
                               f"want the {len(AUTH_VALUE)}-byte bearer header")
        st, body = harness.http_get(f"http://127.0.0.1:{port}/")
        if st != 200 or b"bench-upstream" not in body:
            raise RuntimeError(f"target {t}: unexpected response {st} {body[:100]!r}")
        st, body = harness.http_get(f"http://127.0.0.1:{port}/__tls")
        if is_tls(t):
            if not body.startswith(b"TLSv1."):
                raise RuntimeError(f"target {t}: did not reach the upstream over TLS ({body[:60]!r})")
            self.data.setdefault("upstream_tls", {})[t] = body.decode(errors="replace")
        elif b"bench-upstream" not in body:
            raise RuntimeError(f"target {t}: /__tls answered {body[:60]!r} on the plain upstream")

    def stop_target(self, t):
        p = self.procs.pop(t, None)
        if p is not None:
            harness.stop(p)

    # -- callgrind ------------------------------------------------------------------

    def callgrind(self, t):
        """Restart t under callgrind on fresh ports; warm-up, idle window, request window."""
        self.stop_target(t)
        port, admin = fleet.free_ports(2)
        name = f"callgrind-{t}"
        prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.work}/callgrind.{t}.%p"]
        t0 = time.time()
        p, pid = self.spawn_target(t, port, admin, prefix=prefix, name=name, callgrind=True, ready_timeout=180)
        tg = kind_of(t).startswith("tg-")
        try:
            self.sanity(t, port, timeout=180)
            fleet.Cost.keepalive_requests(port, self.a.callgrind_warmup)
            idle_ir, idle_s = fleet.Cost.callgrind_window(self, pid, t, lambda: time.sleep(self.a.callgrind_idle))
            before = fastpath_counters(admin) if tg else None
            ir, elapsed = fleet.Cost.callgrind_window(self, pid, t, lambda: fleet.Cost.keepalive_requests(port, self.a.callgrind))
            after = fastpath_counters(admin) if tg else None
        except Exception as e:
            raise RuntimeError(f"callgrind ({t}): {e}\n{fleet.Cost.log_tail(self, name)}") from e
        finally:
            harness.stop(p, timeout=60)
        n = self.a.callgrind
        idle_rate = idle_ir / idle_s if idle_ir is not None and idle_s else None
        res = {
            "requests": n, "instructions": ir, "elapsed_s": elapsed,
            "instructions_per_request": ir / n if ir else None,
            "idle_instructions_per_s": idle_rate,
            "instructions_per_request_net": (ir - idle_rate * elapsed) / n if ir and idle_rate is not None else None,
            "wall_s": time.time() - t0,
        }
        if tg:
            res["counters"] = counters_delta(before, after)
        log(f"callgrind {t}: {fmt(res['instructions_per_request'])} instructions/request "
            f"({fmt(res['instructions_per_request_net'])} net of idle {fmt(idle_rate)}/s), {res['wall_s']:.0f} s"
            + (f"; {res['counters']['fastpath_total']}" if tg and res.get("counters") else ""))
        return res

    # -- run ------------------------------------------------------------------------

    def run(self):
        ulimit = subprocess.run(["bash", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip()
        self.data["params"]["ulimit_n"] = ulimit
        log(f"work dir {self.work}; proxies+upstream pinned to core {PROXY_CORE}, wrk to core {LOAD_CORE}")
        try:
            self.start_upstream()
            # Start and check every target first: one that does not work is left out (and
            # said so in the report) instead of ending a 20-minute run.
            for t in list(self.a.targets):
                try:
                    self.start_target(t)
                    self.sanity(t)
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    tail = fleet.Cost.log_tail(self, t, 6).strip()
                    log(f"target {t} left out: {e}\n{tail}")
                    self.data["skipped"][t] = (f"did not start or failed the sanity check: {str(e)[:300]}"
                                               + (f"; its log ends: `{' / '.join(tail.splitlines())[-400:]}`" if tail else ""))
                    self.stop_target(t)
                    self.pids.pop(t, None)
                    self.a.targets.remove(t)
            self.data["params"]["targets"] = list(self.a.targets)
            tgs = [t for t in self.a.targets if kind_of(t).startswith("tg-")]
            before = {t: safe_counters(self.ports[t + "_admin"]) for t in tgs}
            try:
                self.main_rounds()
            except Exception as e:  # noqa: BLE001 - keep what was measured; the report says so
                log(f"the load rounds stopped early: {e}")
                self.data["rounds_error"] = str(e)[:500]
            for t in tgs:
                after = safe_counters(self.ports[t + "_admin"])
                self.fastpath[t] = {"after_run": after, "rounds": counters_delta(before[t], after)}
                if after:
                    log(f"{t}: tollgate_fastpath_total {after['fastpath_total']}, "
                        f"tollgate_requests_total {after['requests_total']:.0f}")
            self.data["fastpath_counters"] = self.fastpath
            cg = {}
            if self.a.callgrind:
                for t in [t for t in self.a.targets if t in self.a.callgrind_targets]:
                    try:
                        cg[t] = self.callgrind(t)
                    except Exception as e:  # noqa: BLE001 - reported, the run goes on
                        log(f"callgrind {t} failed: {e}")
                        cg[t] = {"error": str(e)[:500]}
            self.data["callgrind"] = cg
        finally:
            self.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.data["noise_spent_s"] = round(self.noise_spent)
            harness.stop_all()
            if self.a.keep_work:
                log(f"work directory kept: {self.work}")
            else:
                shutil.rmtree(self.work, ignore_errors=True)
        return self.data


# --------------------------------------------------------------------------- summary + report


def summarize(d):
    conns = d["params"]["conns"]
    rows = {}
    for t in d["params"]["targets"]:
        r = {}
        for c in conns:
            st = [x for x in d["steps"] if x["target"] == t and x["kind"] == f"wrk{c}"]
            cpu = [x.get("proxy_cpu_us_per_req") for x in st]
            r[c] = {
                "rps": med([x.get("rps") for x in st]),
                "rps_range": [min(x["rps"] for x in st), max(x["rps"] for x in st)] if st else None,
                "cpu_us": med(cpu),
                "cpu_range": [min(cpu), max(cpu)] if st and None not in cpu else None,
                "upstream_cpu_us": med([x.get("upstream_cpu_us_per_req") for x in st]),
                "upstream_conns_opened": med([x.get("upstream_conns_opened") for x in st]),
                "errors": sum(x.get("errors") or 0 for x in st),
                "requests": sum(x.get("requests") or 0 for x in st),
            }
        rows[t] = r
    return rows


def verdict(ok):
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def goals(d, rows):
    """[(goal, measured, verdict)] for issue 13's three goals, per connection count."""
    out = []
    cg = d.get("callgrind") or {}
    for c in d["params"]["conns"]:
        on, ng = rows.get("tg-on", {}).get(c), rows.get("nginx", {}).get(c)
        if on and ng and on["cpu_us"] and ng["cpu_us"]:
            r = on["cpu_us"] / ng["cpu_us"]
            overlap = on["cpu_range"] and ng["cpu_range"] and on["cpu_range"][0] <= ng["cpu_range"][1] \
                and ng["cpu_range"][0] <= on["cpu_range"][1]
            out.append((f"plain upstream, {c} connections: tollgate fast path CPU/request ≤ nginx's",
                        f"{on['cpu_us']:.1f} vs {ng['cpu_us']:.1f} µs ({r:.2f}×)"
                        + ("; per-round ranges overlap" if overlap else "") + share_text(d, "tg-on"),
                        verdict(r <= GOAL_CPU_VS_NGINX)))
        else:
            out.append((f"plain upstream, {c} connections: tollgate fast path CPU/request ≤ nginx's",
                        "not measured", verdict(None)))
    c_on = cg.get("tg-on") or {}
    net, gross = c_on.get("instructions_per_request_net"), c_on.get("instructions_per_request")
    ng = (cg.get("nginx") or {}).get("instructions_per_request_net")
    out.append((f"plain upstream: fast path user-space instructions ≤ {GOAL_INSTRUCTIONS:,}/request (callgrind, net of idle)",
                (f"{net:,.0f} net ({gross:,.0f} gross)" + (f"; nginx {ng:,.0f} net" if ng else "")) if net else "not measured",
                verdict(net <= GOAL_INSTRUCTIONS if net else None)))
    for c in d["params"]["conns"]:
        on, ng = rows.get("tg-on-tls", {}).get(c), rows.get("nginx-tls", {}).get(c)
        g = f"TLS upstream, {c} connections: tollgate fast path CPU/request ≤ 1.10 × nginx's (proxy_ssl + keep-alive)"
        if on and ng and on["cpu_us"] and ng["cpu_us"]:
            r = on["cpu_us"] / ng["cpu_us"]
            out.append((g, f"{on['cpu_us']:.1f} vs {ng['cpu_us']:.1f} µs ({r:.2f}×)" + share_text(d, "tg-on-tls"),
                        verdict(r <= GOAL_TLS_VS_NGINX)))
        else:
            out.append((g, "not measured", verdict(None)))
    return out


def fast_share(d, t):
    """Share of tollgate target t's requests during the rounds that the fast path served."""
    c = ((d.get("fastpath_counters") or {}).get(t) or {}).get("rounds")
    if not c or not c.get("requests_total"):
        return None
    return c["fastpath_total"].get("fast/served", 0) / c["requests_total"]


def share_text(d, t):
    sh = fast_share(d, t)
    return "" if sh is None else f"; fast path served {100 * sh:.0f} % of its requests"


def fp_text(counters):
    if not counters:
        return "–"
    fp = counters["fastpath_total"]
    parts = [f"`{k}` {v:,.0f}" for k, v in sorted(fp.items()) if v]
    return (", ".join(parts) or "none") + f"; `tollgate_requests_total` {counters['requests_total']:,.0f}"


def report(d, facts, label):
    rows = summarize(d)
    p = d["params"]
    conns = p["conns"]
    cg = d.get("callgrind") or {}
    out = []
    w = out.append
    w(f"# tollgate fast path benchmark (issue 13) — {label}")
    w("")
    if p.get("quick"):
        w(f"**Smoke run** (`--quick`: {p['rounds']} round of {p['duration_s']} s steps, {fmt(p['callgrind_requests'])} "
          "callgrind requests): it shows that every part of the "
          "benchmark works; its figures are too short to draw conclusions from.")
        w("")
    w("Produced by `bench/fastpath.sh`: nginx, HAProxy, bare pingora and tollgate with `proxy.fast_path` off and on, "
      "side by side in one run, against a plain-HTTP and a TLS upstream.")
    w("")
    machine_section(w, facts)
    w("## Goals (issue 13)")
    w("")
    w("| goal | measured (medians) | verdict |")
    w("|---|---|---|")
    for g, m, v in goals(d, rows):
        w(f"| {g} | {m} | {v} |")
    w("")
    w("## Method")
    w("")
    w(f"- **Upstream**: one nginx worker (`bench/conf/nginx-upstream.conf`) answers a 53-byte JSON body with keep-alive "
      f"on a plain listener and on a TLS listener (`bench/conf/fastpath-upstream-tls.conf`: TLS 1.2/1.3, an EC P-256 "
      f"certificate for `{SNI}` and 127.0.0.1 from a throwaway CA made with openssl at the start of the run). Its second "
      "server block is tollgate's token endpoint (an 807-byte opaque token for 3600 s, so nothing is refreshed).")
    w("- **Proxies**, one worker thread each, each inserting `Authorization: Bearer <807 bytes>`, upstream keep-alive "
      "pool of 1024: nginx (`fastpath-nginx-proxy.conf`; TLS: `proxy_pass https://`, `proxy_ssl_session_reuse on`, "
      "`proxy_ssl_verify off`), HAProxy (`fastpath-haproxy.cfg`, `http-reuse always`; TLS: `ssl verify none`), bare "
      f"pingora (`examples/bare_proxy.rs`; TLS only with the `{BARE_TLS_KNOB}` knob), tollgate "
      "(`fastpath-tollgate.toml`, no access log, `proxy.fast_path` false / true; TLS: an `https://127.0.0.1:…` "
      f"upstream with `ca_file` = the run's CA and `sni = \"{SNI}\"`, so the certificate is verified). Before "
      "measuring, every target is checked: the upstream received the exact header, and a TLS target reached the "
      "TLS listener (it echoes the negotiated protocol and cipher).")
    w(f"- **CPU per request**: proxies and the upstream pinned to core {p['proxy_core']}, wrk to core {p['load_core']}. "
      f"After a 2 s warm-up of each target, {p['rounds']} interleaved round(s) (every target in turn, each round) of "
      f"`wrk -t1 -cC -d{p['duration_s']}s` for C = {', '.join(map(str, conns))}, each right after an unmeasured "
      f"{p.get('step_warmup_s')} s wrk at the same C (refills the proxy's idle upstream pool, so every target is "
      "measured in its keep-alive steady state). Proxy CPU µs/request = utime+stime "
      "of the proxy process (`/proc/<pid>/stat`; nginx: its worker) over the step ÷ requests completed; medians over "
      "rounds, min–max in brackets. Before each round the run waits (bounded) for an idle machine; a step during which "
      "other processes took more than 10 % of a core is repeated (at most twice; harness.py's rules).")
    w("- **Peak RSS**: `VmHWM` of the proxy process (nginx: its worker) after the rounds.")
    if p["callgrind_requests"]:
        w(f"- **Instructions per request**: each target restarted under `valgrind --tool=callgrind` (nginx with "
          f"`master_process off`), {fmt(p['callgrind_warmup'])} warm-up requests, a {p['callgrind_idle_s']:g} s idle "
          f"window, then {fmt(p['callgrind_requests'])} GETs on one keep-alive connection; instructions of the whole "
          "process between `callgrind_control -z` and `-d` (user space only: callgrind does not see the kernel). "
          "*Net* subtracts the process's idle rate (timers, background tasks) over the request window.")
    w("")
    for up in UPSTREAMS:
        ts = [t for t in p["targets"] if is_tls(t) == (up == "tls")]
        if not ts:
            continue
        w(f"## {'Plain-HTTP' if up == 'plain' else 'TLS'} upstream")
        w("")
        head = ["target"] + [f"req/s @{c}" for c in conns] + [f"proxy CPU µs/req @{c}" for c in conns] + \
            [f"upstream CPU µs/req @{conns[0]}", f"upstream conns opened @{conns[-1]}", "instructions/req (callgrind)",
             "net of idle", "peak RSS MiB", "errors"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for t in ts:
            r = rows[t]
            c = cg.get(t) or {}
            rss = (d.get("rss_kib") or {}).get(t)
            cells = [name_of(t)]
            cells += [rng([x["rps"] for x in d["steps"] if x["target"] == t and x["kind"] == f"wrk{n}"]) for n in conns]
            cells += [rng([x.get("proxy_cpu_us_per_req") for x in d["steps"] if x["target"] == t and x["kind"] == f"wrk{n}"], 1)
                      for n in conns]
            cells += [fmt(r[conns[0]]["upstream_cpu_us"], 1), fmt(r[conns[-1]]["upstream_conns_opened"]),
                      "failed" if c.get("error") else fmt(c.get("instructions_per_request")),
                      fmt(c.get("instructions_per_request_net")),
                      fmt(rss / 1024 if rss else None, 1), str(sum(r[n]["errors"] for n in conns))]
            w("| " + " | ".join(cells) + " |")
        w("")
        on, off, ng = (t + ("-tls" if up == "tls" else "") for t in ("tg-on", "tg-off", "nginx"))
        if on in rows and off in rows:
            parts = []
            for n in conns:
                a, b = rows[on][n]["cpu_us"], rows[off][n]["cpu_us"]
                if a and b:
                    parts.append(f"@{n} {a / b:.2f}×")
            ca, cb = (cg.get(on) or {}).get("instructions_per_request_net"), (cg.get(off) or {}).get("instructions_per_request_net")
            w(f"fast path on ÷ off: CPU/request {', '.join(parts) or '–'}"
              + (f"; instructions {ca / cb:.2f}×" if ca and cb else "") + ".")
            w("")
        sh = fast_share(d, on)
        if sh is not None and sh < 0.99:
            w(f"**Note**: with `fast_path = true` the fast path served {100 * sh:.0f} % of this target's requests; "
              "the rest went to pingora (reasons in the counters below), so its figures are largely pingora's.")
            w("")
    w("## Which path served the requests (tollgate targets)")
    w("")
    w("`tollgate_fastpath_total{path,reason}` counts requests served by the fast path (`fast/served`) and "
      "connections handed to pingora (`pingora/<reason>`; pingora then serves every request of that connection). "
      "`tollgate_requests_total` counts every proxied request, whichever path served it.")
    w("")
    w("| target | served by the fast path (rounds) | after the run (since start: checks, warm-up, rounds) | "
      "during the rounds (warm-up included) | during the callgrind window |")
    w("|---|---|---|---|---|")
    for t in p["targets"]:
        if not kind_of(t).startswith("tg-"):
            continue
        fc = (d.get("fastpath_counters") or {}).get(t) or {}
        sh = fast_share(d, t)
        w(f"| {name_of(t)} | {fmt(None if sh is None else 100 * sh, 1)} % | {fp_text(fc.get('after_run'))} | "
          f"{fp_text(fc.get('rounds'))} | {fp_text((cg.get(t) or {}).get('counters'))} |")
    w("")
    if d.get("upstream_tls"):
        w("TLS negotiated with the upstream (as the upstream saw it on the check request): "
          + "; ".join(f"{name_of(t)}: `{v}`" for t, v in d["upstream_tls"].items()) + ".")
        w("")
    skipped = d.get("skipped") or {}
    if skipped:
        w("## Left out")
        w("")
        for t, why in skipped.items():
            w(f"- {name_of(t) if kind_of(t) in KIND_NAMES else t}: {why}")
        w("")
    if d.get("rounds_error"):
        w(f"**The load rounds stopped early** ({d['rounds_error']}); the tables hold the steps measured before that.")
        w("")
    failed = {t: c["error"] for t, c in cg.items() if c.get("error")}
    if failed:
        w("Callgrind failed for: " + "; ".join(f"{name_of(t)}: {e[:200]}" for t, e in failed.items()))
        w("")
    w(fleet.noise_line(d["steps"], p["proxy_core"]) + f" Waiting for quiet and repeats took {d.get('noise_spent_s')} s.")
    w("")
    w(f"Run: {d['started_utc']} – {d.get('finished_utc')}; raw data in the JSON file next to this one.")
    w("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="fastpath")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", help="raw JSON output (required unless --render)")
    ap.add_argument("--render", metavar="RAW_JSON", help="only write the report (--out-md) again from a run's raw JSON")
    ap.add_argument("--facts")
    ap.add_argument("--tollgate", default=os.path.join(REPO, "target/release/tollgate"))
    ap.add_argument("--bare-proxy", default=os.path.join(REPO, "target/release/examples/bare_proxy"))
    ap.add_argument("--bare-source", default=os.path.join(REPO, "examples/bare_proxy.rs"),
                    help=f"the bare pingora TLS target runs when this file mentions {BARE_TLS_KNOB}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test (~3 min): 1 round of 3 s steps, 200 callgrind requests, short quiet waits")
    ap.add_argument("--kinds", default=",".join(KINDS), help="proxies: " + ",".join(KINDS))
    ap.add_argument("--upstreams", default="plain,tls")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk step")
    ap.add_argument("--conns", default="64,256", help="wrk connection counts")
    ap.add_argument("--step-warmup", type=int, default=1,
                    help="seconds of unmeasured wrk at the step's concurrency right before each step (0: none)")
    ap.add_argument("--callgrind", type=int, default=2000, help="requests under callgrind per target (0: skip)")
    ap.add_argument("--callgrind-warmup", type=int, default=200)
    ap.add_argument("--callgrind-idle", type=float, default=3.0)
    ap.add_argument("--callgrind-upstreams", default="plain,tls", help="the upstreams whose targets run under callgrind")
    ap.add_argument("--quiet-wait", type=int, default=60,
                    help="max seconds to wait for an idle box before each round / repeated step")
    ap.add_argument("--noise-limit", type=float, default=0.10)
    ap.add_argument("--noise-retries", type=int, default=2)
    ap.add_argument("--noise-budget", type=int, default=180,
                    help="total seconds the run may spend waiting for quiet or repeating noisy steps")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--keep-raw", action="store_true")
    a = ap.parse_args()
    if a.render:
        with open(a.render) as f:
            raw = json.load(f)
        with open(a.out_md, "w") as f:
            f.write(report(raw["run"], raw.get("facts") or {}, raw.get("label") or a.label))
        log(f"wrote {a.out_md} from {a.render}")
        return
    if not a.out_json:
        ap.error("--out-json is required")
    if a.quick:
        given = {arg.split("=", 1)[0] for arg in sys.argv[1:]}
        for opt, attr, val in (("--rounds", "rounds", 1), ("--duration", "duration", 3), ("--callgrind", "callgrind", 200),
                               ("--callgrind-warmup", "callgrind_warmup", 30), ("--callgrind-idle", "callgrind_idle", 1.0),
                               ("--quiet-wait", "quiet_wait", 10), ("--noise-budget", "noise_budget", 20),
                               ("--noise-retries", "noise_retries", 1)):
            if opt not in given:
                setattr(a, attr, val)
    # What harness.Bench reads.
    a.conns = [int(x) for x in a.conns.split(",") if x]
    a.rate = a.rate_conns = None
    a.skip_rate = True
    kinds = [k for k in a.kinds.split(",") if k]
    ups = [u for u in a.upstreams.split(",") if u]
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k} (one of {','.join(KINDS)})")
    a.skipped = {}
    a.targets = []
    for up in UPSTREAMS:
        if up not in ups:
            continue
        for k in kinds:
            t = k + ("-tls" if up == "tls" else "")
            if k.startswith("tg-") and not os.access(a.tollgate, os.X_OK):
                a.skipped[t] = f"{a.tollgate} missing"
                continue
            if k == "bare" and not os.access(a.bare_proxy, os.X_OK):
                a.skipped[t] = f"{a.bare_proxy} missing"
                continue
            if t == "bare-tls":
                try:
                    with open(a.bare_source) as f:
                        knob = BARE_TLS_KNOB in f.read()
                except OSError:
                    knob = False
                if not knob:
                    a.skipped[t] = (f"examples/bare_proxy.rs has no TLS upstream knob (`{BARE_TLS_KNOB}`); "
                                    "bare pingora is measured with the plain upstream only")
                    continue
            a.targets.append(t)
    cups = [u for u in a.callgrind_upstreams.split(",") if u]
    a.callgrind_targets = [t for t in a.targets if ("tls" if is_tls(t) else "plain") in cups]
    if a.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        log("valgrind not installed: skipping callgrind")
        a.callgrind = 0
    atexit.register(harness.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    log(f"targets: {', '.join(a.targets)}; callgrind: {', '.join(a.callgrind_targets) if a.callgrind else 'off'}")
    d = FastBench(a).run()
    facts = {}
    if a.facts:
        with open(a.facts) as f:
            facts = json.load(f)
    rows = summarize(d)
    with open(a.out_json, "w") as f:
        json.dump({"label": a.label, "facts": facts, "summary": {t: {str(c): v for c, v in r.items()} for t, r in rows.items()},
                   "goals": goals(d, rows), "run": d}, f, indent=1)
    with open(a.out_md, "w") as f:
        f.write(report(d, facts, a.label))
    for g, m, v in goals(d, rows):
        log(f"goal: {g}: {m} -> {v.strip('*')}")
    log(f"wrote {a.out_md} (raw: {a.out_json})")


if __name__ == "__main__":
    main()
