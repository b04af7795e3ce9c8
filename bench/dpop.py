#!/usr/bin/env python3
"""DPoP cost benchmark (driven by bench/dpop.sh; see bench/README.md, "DPoP cost").

What a provider with `dpop = true` costs per proxied request: every request then carries
`Authorization: DPoP <token>` and a fresh ES256 proof (src/jose/dpop.rs `DpopKey::proof`).
Side by side in one run, with the method of harness.py / fleet.py:

- direct: wrk against the upstream nginx (its CPU per request, the floor);
- bearer: tollgate, `bench/conf/tollgate.toml` (token endpoint `/token`, `token_type` bearer);
- dpop:   the same config with `dpop = true` and the token endpoint `/token-dpop`, which
          answers the same 807-byte token with `token_type = "DPoP"`.

The proxies and the upstream on core 0, wrk on core 1; interleaved rounds of
`wrk -t1 -c64 -d10s`; CPU µs per request of the proxy process from /proc/<pid>/stat;
medians. With valgrind, also callgrind instructions per request for both tollgates.
Everything on 127.0.0.1, free ports; every step bounded in time or request count.
"""

import argparse
import atexit
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True
import harness  # noqa: E402
import fleet  # noqa: E402  (free_ports, /metrics counters, callgrind helpers, formatting)
from fleet import fmt, med, rng  # noqa: E402
from report import machine_section  # noqa: E402
from harness import CLK_TCK, PROXY_CORE, LOAD_CORE, log  # noqa: E402

VARIANTS = ("direct", "bearer", "dpop")
PROXIES = ("bearer", "dpop")
NAMES = {"direct": "direct (upstream alone)", "bearer": "tollgate, bearer", "dpop": "tollgate, DPoP"}


class Dpop(fleet.Cost):
    """fleet.Cost's load steps and callgrind window, for bearer vs DPoP instead of two stores."""

    def __init__(self, a):
        self.a = a
        self.work = tempfile.mkdtemp(prefix="tollgate-dpop.")
        os.makedirs(os.path.join(self.work, "tmp"), exist_ok=True)
        self.noise_spent = 0.0
        names = ("UP", "IDP", "bearer", "dpop", "bearer_admin", "dpop_admin")
        self.ports = dict(zip(names, fleet.free_ports(len(names))))
        self.ports["direct"] = self.ports["UP"]
        self.pids = {}
        self.data = {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {"rounds": a.rounds, "duration_s": a.duration, "conns": a.conns,
                       "proxy_core": PROXY_CORE, "load_core": LOAD_CORE, "token_lifetime_s": 3600},
            "steps": [],
        }

    def conf_path(self, variant, redis_timeout=None):
        path = harness.render("tollgate.toml", os.path.join(self.work, f"tollgate-{variant}.toml"),
                              PORT=self.ports[variant], ADMIN_PORT=self.ports[f"{variant}_admin"],
                              IDP_PORT=self.ports["IDP"],
                              TOKEN_PATH="/token-dpop" if variant == "dpop" else "/token",
                              UP_PORT=self.ports["UP"])
        if variant == "dpop":
            with open(path) as f:
                text = f.read()
            anchor = 'client_secret = "bench-secret"\n'
            if anchor not in text:
                raise SystemExit("bench/conf/tollgate.toml changed: no client_secret line to add `dpop = true` after")
            with open(path, "w") as f:
                f.write(text.replace(anchor, anchor + "dpop = true\n", 1))
        return path

    def start(self):
        p = self.ports
        conf = harness.render("nginx-upstream.conf", os.path.join(self.work, "nginx-upstream.conf"),
                              WORK=self.work, TOKEN=harness.TOKEN, UP_PORT=p["UP"], IDP_PORT=p["IDP"])
        ng = harness.spawn("nginx-upstream", ["nginx", "-p", self.work, "-c", conf], self.work)
        harness.wait_port(p["UP"], proc=ng)
        self.up_worker = harness.worker_pid(ng.pid)
        self.procs = {}
        for v in PROXIES:
            self.procs[v] = self.start_tollgate(v)
            self.pids[v] = self.procs[v].pid
        self.pids["direct"] = None
        for v in PROXIES:
            self.sanity(v)
        log(f"upstream nginx worker {self.up_worker}, tollgate bearer {self.pids['bearer']}, "
            f"tollgate DPoP {self.pids['dpop']}")

    def sanity(self, variant, timeout=30):
        """The upstream sees the scheme each provider should send and, for DPoP, a fresh
        proof per request (two requests, two distinct well-formed JWTs of type dpop+jwt)."""
        port = self.ports[variant]
        st, body = harness.http_get_retrying(f"http://127.0.0.1:{port}/__auth", timeout)
        want = ("DPoP " if variant == "dpop" else "Bearer ") + harness.TOKEN
        if st != 200 or body != want.encode():
            raise RuntimeError(f"tollgate ({variant}): the upstream did not see `Authorization: "
                               f"{want.split()[0]} <token>` (got {body[:20]!r}…)")
        proofs = [harness.http_get(f"http://127.0.0.1:{port}/__dpop")[1] for _ in range(2)]
        if variant == "bearer":
            if any(proofs):
                raise RuntimeError("tollgate (bearer) sent a DPoP header")
            return
        if proofs[0] == proofs[1]:
            raise RuntimeError("tollgate (dpop): two requests carried the same proof")
        for pr in proofs:
            parts = pr.split(b".")
            if len(parts) != 3:
                raise RuntimeError(f"tollgate (dpop): the DPoP header is not a JWS ({pr[:40]!r}…)")
            head = json.loads(base64.urlsafe_b64decode(parts[0] + b"=" * (-len(parts[0]) % 4)))
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
            if head.get("typ") != "dpop+jwt" or head.get("alg") != "ES256" or not claims.get("ath"):
                raise RuntimeError(f"tollgate (dpop): unexpected proof header/claims {head} {sorted(claims)}")
        self.proof_bytes = len(proofs[0])

    def step(self, variant, rnd):
        port = self.ports[variant]
        pids = {"proxy": self.pids[variant], "upstream": self.up_worker}
        admin = self.ports.get(variant + "_admin")
        retries = 0
        while True:
            self.wait_quiet()
            before = fleet.counters(admin) if admin else None
            with harness.Sampler(pids) as s:
                res = harness.run_wrk(port, self.a.conns, self.a.duration)
            after = fleet.counters(admin) if admin else None
            res.update(s.result())
            noisy = res["core0_total_s"] and res["core0_foreign_s"] > self.a.noise_limit * res["core0_total_s"]
            if not noisy or retries >= self.a.noise_retries or self.noise_spent >= self.a.noise_budget:
                break
            retries += 1
            self.noise_spent += s.t1 - s.t0
            log(f"r{rnd} {variant}: other processes took {res['core0_foreign_s']:.2f}s of core 0; repeating")
        res.pop("raw", None)
        n = res["requests"]
        proxy = res["cpu_s"].get("proxy")
        res.update({
            "variant": variant, "round": rnd, "retries": retries,
            "proxy_cpu_us_per_req": proxy * 1e6 / n if n and proxy is not None else None,
            "upstream_cpu_us_per_req": res["cpu_s"]["upstream"] * 1e6 / n if n else None,
            "token_fetches": after["token_fetches"] - before["token_fetches"] if admin else 0,
        })
        pc = res["proxy_cpu_us_per_req"]
        log(f"r{rnd} {variant:6s}: {res['rps']:,.0f} req/s, proxy {fmt(pc, 1)} µs/req, upstream "
            f"{res['upstream_cpu_us_per_req']:.1f} µs/req, {res['errors']} errors")
        self.data["steps"].append(res)

    def rounds(self):
        for v in VARIANTS:  # warm-up: connections, pools, allocator
            harness.run_wrk(self.ports[v], self.a.conns, 2)
        order = list(VARIANTS)
        for rnd in range(1, self.a.rounds + 1):
            for v in order:
                self.step(v, rnd)
            order = order[1:] + order[:1]
        self.data["rss_kib"] = {v: harness.vm_hwm_kib(self.pids[v]) for v in PROXIES}
        self.data["proof_bytes"] = getattr(self, "proof_bytes", None)

    def callgrind(self):
        out = {}
        for v in PROXIES:
            harness.stop(self.procs[v])
            prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.work}/callgrind.{v}.%p"]
            p = self.start_tollgate(v, prefix=prefix, name=f"callgrind-{v}", ready_timeout=180)
            port = self.ports[v]
            try:
                self.sanity(v, timeout=180)
                self.keepalive_requests(port, self.a.callgrind_warmup)
                idle_ir, idle_s = self.callgrind_window(p.pid, v, lambda: time.sleep(self.a.callgrind_idle))
                ir, elapsed = self.callgrind_window(p.pid, v, lambda: self.keepalive_requests(port, self.a.callgrind))
            except Exception as e:
                raise RuntimeError(f"callgrind ({v}): {e}\n{self.log_tail(f'callgrind-{v}')}") from e
            finally:
                harness.stop(p, timeout=60)
            n = self.a.callgrind
            idle_rate = idle_ir / idle_s if idle_ir is not None else None
            out[v] = {
                "requests": n, "instructions": ir, "elapsed_s": elapsed,
                "instructions_per_request": ir / n if ir else None,
                "idle_instructions_per_s": idle_rate,
                "instructions_per_request_net": (ir - idle_rate * elapsed) / n if ir and idle_rate is not None else None,
            }
            log(f"callgrind {v}: {out[v]['instructions_per_request'] or 0:,.0f} instructions/request, "
                f"idle {idle_rate or 0:,.0f}/s")
        return out

    def start_tollgate(self, variant, prefix=(), name=None, ready_timeout=30, redis_timeout=None):
        return super().start_tollgate(variant, prefix=prefix, name=name, ready_timeout=ready_timeout)


def proof_cost(a):
    """examples/dpop_cost: µs per `DpopKey::proof` alone, pinned to the proxy core."""
    if not a.dpop_cost or not os.path.exists(a.dpop_cost):
        log("examples/dpop_cost not built: skipping the proof-alone figure")
        return None
    p = subprocess.run(["taskset", "-c", PROXY_CORE, a.dpop_cost, str(a.proofs), "9"],
                       capture_output=True, text=True, timeout=300, check=True)
    r = json.loads(p.stdout)
    log(f"dpop_cost: {r['wall_us_per_proof']['median']:.2f} µs per proof")
    return r


def summary(cost, proof):
    s = {}
    for v in VARIANTS:
        st = [x for x in cost["steps"] if x["variant"] == v]
        s[v] = {"rps": med([x["rps"] for x in st]),
                "proxy_cpu_us_per_req": med([x["proxy_cpu_us_per_req"] for x in st]),
                "upstream_cpu_us_per_req": med([x["upstream_cpu_us_per_req"] for x in st]),
                "requests": sum(x["requests"] for x in st)}
        if v != "direct":
            xs = [x["proxy_cpu_us_per_req"] for x in st]
            s[v]["cpu_range"] = (min(xs), max(xs))
    b, d = s["bearer"], s["dpop"]
    s["cpu_delta_us"] = d["proxy_cpu_us_per_req"] - b["proxy_cpu_us_per_req"]
    s["cpu_ratio"] = d["proxy_cpu_us_per_req"] / b["proxy_cpu_us_per_req"]
    s["rps_ratio"] = d["rps"] / b["rps"]
    cg = cost.get("callgrind") or {}
    if all((cg.get(v) or {}).get("instructions_per_request") for v in PROXIES):
        s["instructions_delta"] = cg["dpop"]["instructions_per_request"] - cg["bearer"]["instructions_per_request"]
        s["instructions_ratio"] = cg["dpop"]["instructions_per_request"] / cg["bearer"]["instructions_per_request"]
    if all((cg.get(v) or {}).get("instructions_per_request_net") for v in PROXIES):
        s["instructions_delta_net"] = (cg["dpop"]["instructions_per_request_net"]
                                       - cg["bearer"]["instructions_per_request_net"])
    if proof:
        s["proof_us"] = proof["wall_us_per_proof"]["median"]
    return s


def report(cost, proof, facts, label, s):
    out = []
    w = out.append
    p = cost["params"]
    st = cost["steps"]
    w(f"# tollgate DPoP cost — {label}")
    w("")
    w("Produced by `bench/dpop.sh`: CPU per proxied request with a bearer provider and with a `dpop = true` "
      "provider (RFC 9449: `Authorization: DPoP <token>` and a fresh ES256 proof on every request), side by side "
      "in one run.")
    w("")
    machine_section(w, facts)
    w("## Method")
    w("")
    w(f"One nginx (`bench/conf/nginx-upstream.conf`, `worker_processes 1`) is the upstream and the token endpoint: "
      f"`/token` answers an 807-byte opaque token with `token_type` bearer, `/token-dpop` the same token with "
      f"`token_type = \"DPoP\"`, both `expires_in` {p['token_lifetime_s']} s (no refresh during the run). Two "
      f"tollgate processes from `bench/conf/tollgate.toml` (`proxy.threads = 1`), identical apart from the token path "
      f"and `dpop = true` (key generated at start). Before measuring, the upstream echoes what it received: "
      f"`Bearer <token>` and no `DPoP` header from one; `DPoP <token>` and, on two requests, two distinct ES256 "
      f"`dpop+jwt` proofs with `ath` from the other (proof: {fmt(cost.get('proof_bytes'))} bytes). The proxies and "
      f"the upstream run on core {p['proxy_core']}, wrk on core {p['load_core']}. {p['rounds']} interleaved rounds "
      f"(the order rotates each round) of `wrk -t1 -c{p['conns']} -d{p['duration_s']}s` per target after a 2 s "
      "warm-up of each. CPU µs/req = utime+stime delta of the proxy process (`/proc/<pid>/stat`) ÷ requests "
      "completed; for *direct*, the upstream's only. Steps are repeated (at most twice) when other processes took "
      "more than 10 % of core 0.")
    w("")
    w("| target | req/s, median (min–max) | proxy CPU µs/req, median (min–max) | upstream CPU µs/req | "
      "instructions/request (callgrind) | net of idle | peak RSS MiB | errors |")
    w("|---|---|---|---|---|---|---|---|")
    cg = cost.get("callgrind") or {}
    for v in VARIANTS:
        xs = [x for x in st if x["variant"] == v]
        rss = (cost.get("rss_kib") or {}).get(v)
        c = cg.get(v) or {}
        w("| " + " | ".join([
            NAMES[v], rng([x["rps"] for x in xs]),
            "–" if v == "direct" else rng([x["proxy_cpu_us_per_req"] for x in xs], 1),
            fmt(med([x["upstream_cpu_us_per_req"] for x in xs]), 1),
            fmt(c.get("instructions_per_request")), fmt(c.get("instructions_per_request_net")),
            fmt(rss / 1024 if rss else None, 1), str(sum(x["errors"] for x in xs)),
        ]) + " |")
    w("")
    w(f"**DPoP − bearer**: proxy CPU {fmt(s['cpu_delta_us'], 1)} µs per request ({fmt(s['cpu_ratio'], 3)}×); "
      f"throughput {fmt(s['rps_ratio'], 3)}×"
      + (f"; callgrind {fmt(s['instructions_delta'])} instructions per request ({fmt(s['instructions_ratio'], 3)}×"
         + (f", net of idle {fmt(s['instructions_delta_net'])}" if "instructions_delta_net" in s else "") + ")"
         if "instructions_delta" in s else "") + ".")
    w("")
    if cg:
        w(f"Callgrind: each tollgate restarted under `valgrind --tool=callgrind`; {fmt(cg['bearer']['requests'])} "
          "requests on one keep-alive connection after a warm-up, counters zeroed and dumped around them "
          "(`callgrind_control -z` / `-d`); instructions of the whole process. *Net of idle* subtracts what the "
          "process executes on its own per second (measured in an idle window before) over the request window.")
        w("")
    if proof:
        wp = proof["wall_us_per_proof"]
        w(f"**One proof alone** (`examples/dpop_cost`, `DpopKey::proof(\"GET\", htu, Some(ath), None)` in a loop, "
          f"pinned to core {p['proxy_core']}, {proof['batches']} batches of {proof['proofs_per_batch']:,}): "
          f"{wp['median']:.2f} µs per proof (min {wp['min']:.2f}, max {wp['max']:.2f}), {proof['proof_bytes']} bytes.")
        w("")
    w(fleet.noise_line(st, p["proxy_core"]))
    w("")
    w("## Reading")
    w("")
    lo_b, hi_b = s["bearer"]["cpu_range"]
    lo_d, hi_d = s["dpop"]["cpu_range"]
    overlap = lo_d <= hi_b and lo_b <= hi_d
    w(f"- With DPoP tollgate spent {s['dpop']['proxy_cpu_us_per_req']:.1f} µs of CPU per request, with a bearer token "
      f"{s['bearer']['proxy_cpu_us_per_req']:.1f} µs: {s['cpu_delta_us']:+.1f} µs per request. "
      + ("The per-round ranges overlap, so the difference is within run-to-run noise."
         if overlap else "The per-round ranges do not overlap."))
    if proof:
        share = 100 * s["proof_us"] / s["cpu_delta_us"] if s["cpu_delta_us"] > 0 else None
        w(f"- One proof alone (`examples/dpop_cost`) costs {s['proof_us']:.2f} µs"
          + (f", {share:.0f} % of the measured difference; the rest is building the `htu` and "
             f"writing the extra {fmt(cost.get('proof_bytes'))}-byte header per request, plus run-to-run noise." if share is not None else "."))
    if "instructions_delta" in s:
        w(f"- Callgrind, which does not depend on the machine's other load: {s['instructions_delta']:+,.0f} "
          f"instructions per request with DPoP ({s['instructions_ratio']:.3f}×).")
    w("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="dpop")
    ap.add_argument("--tollgate", default=os.path.join(REPO, "target/release/tollgate"))
    ap.add_argument("--dpop-cost", default=os.path.join(REPO, "target/release/examples/dpop_cost"))
    ap.add_argument("--proofs", type=int, default=2000, help="proofs per batch for examples/dpop_cost")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--facts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--callgrind", type=int, default=2000, help="requests under callgrind per tollgate (0: skip)")
    ap.add_argument("--callgrind-warmup", type=int, default=200)
    ap.add_argument("--callgrind-idle", type=float, default=5.0)
    ap.add_argument("--quiet-wait", type=int, default=60)
    ap.add_argument("--noise-limit", type=float, default=0.10)
    ap.add_argument("--noise-retries", type=int, default=2)
    ap.add_argument("--noise-budget", type=int, default=600)
    ap.add_argument("--keep-work", action="store_true")
    a = ap.parse_args()
    atexit.register(harness.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    if a.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        log("valgrind not installed: skipping callgrind")
        a.callgrind = 0
    proof = proof_cost(a)
    cost = Dpop(a).run()
    facts = {}
    if a.facts:
        with open(a.facts) as f:
            facts = json.load(f)
    s = summary(cost, proof)
    with open(a.out_json, "w") as f:
        json.dump({"label": a.label, "facts": facts, "summary": s, "cost": cost, "proof": proof}, f, indent=1)
    with open(a.out_md, "w") as f:
        f.write(report(cost, proof, facts, a.label, s))
    log(f"DPoP − bearer: {s['cpu_delta_us']:+.1f} µs CPU per request"
        + (f", {s['instructions_delta']:+,.0f} instructions per request" if "instructions_delta" in s else ""))
    log(f"wrote {a.out_md} (raw: {a.out_json})")


if __name__ == "__main__":
    main()
