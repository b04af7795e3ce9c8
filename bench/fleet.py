#!/usr/bin/env python3
"""Fleet-mode benchmark (driven by bench/fleet.sh; see bench/README.md, "Fleet mode").

Two parts:

1. count: runs examples/fleet_count (token requests per refresh cycle for fleets of
   1, 2, 4, 8 and 16 replicas, Redis store and memory store).
2. cost: the request path with the memory store and with the Redis store. One tollgate
   each, identical configs except [store], a token that lives an hour (no refresh during
   the run), keep-alive load with wrk, the proxy's CPU per request from /proc/<pid>/stat
   (as harness.py measures it), interleaved rounds, medians. With valgrind, also
   callgrind instructions per request for both.

Then it writes the Markdown report and the raw JSON. Everything runs on 127.0.0.1 on
free ports; every step is bounded in time or request count.
"""

import argparse
import atexit
import glob
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True  # no bench/__pycache__ from importing harness
import harness  # noqa: E402  (shared helpers: spawn, render, wrk, /proc sampling)
from harness import CLK_TCK, PROXY_CORE, LOAD_CORE, log  # noqa: E402
from report import f as fmt, machine_section, med, rng  # noqa: E402  (the number formatting of bench/run.sh's report)

# A 32-byte store key, base64 (benchmark value only, never a real secret).
STORE_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
STORES = ("memory", "redis")


def free_ports(n):
    """n distinct loopback ports that were free a moment ago (all held until all are picked)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def redis_ping(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_commands(port):
    """`total_commands_processed` from the server's INFO (this INFO itself included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
        buf = b""
        deadline = time.time() + 2
        while time.time() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, _, body = buf.partition(b"\r\n")
            if head.startswith(b"$") and len(body) >= int(head[1:]):
                break
    m = re.search(rb"total_commands_processed:(\d+)", buf)
    return int(m.group(1)) if m else None


def metrics_text(admin_port):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sum(text, name, label=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        rest = series[len(name):]
        if rest and not rest.startswith("{"):
            continue
        if label and label not in rest:
            continue
        try:
            total += float(value)
        except ValueError:
            pass
    return total


def counters(admin_port):
    t = metrics_text(admin_port)
    return {
        "requests": metric_sum(t, "tollgate_requests_total"),
        "token_fetches": metric_sum(t, "tollgate_token_fetch_total"),
        "redis_round_trips": metric_sum(t, "tollgate_redis_duration_seconds_count"),
        "redis_errors": metric_sum(t, "tollgate_redis_errors_total"),
    }




# --------------------------------------------------------------------------- part 2: cost


class Cost:
    def __init__(self, a):
        self.a = a
        self.work = tempfile.mkdtemp(prefix="tollgate-fleet-cost.")
        os.makedirs(os.path.join(self.work, "tmp"), exist_ok=True)
        self.noise_spent = 0.0
        names = ("UP", "IDP", "REDIS", "memory", "redis", "memory_admin", "redis_admin")
        self.ports = dict(zip(names, free_ports(len(names))))
        self.pids = {}
        self.data = {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {"rounds": a.rounds, "duration_s": a.duration, "conns": a.conns,
                       "proxy_core": PROXY_CORE, "load_core": LOAD_CORE, "token_lifetime_s": 3600},
            "steps": [],
        }

    def store_table(self, store, timeout="500ms"):
        if store == "memory":
            return '\n[store]\nkind = "memory"\n'
        return (f'\n[store]\nkind = "redis"\nurl = "redis://127.0.0.1:{self.ports["REDIS"]}/0"\n'
                f'encryption_keys = ["{STORE_KEY}"]\nlease_ttl = "2s"\ntimeout = "{timeout}"\n')

    def start(self):
        p = self.ports
        conf = harness.render("nginx-upstream.conf", os.path.join(self.work, "nginx-upstream.conf"),
                              WORK=self.work, TOKEN=harness.TOKEN, UP_PORT=p["UP"], IDP_PORT=p["IDP"])
        ng = harness.spawn("nginx-upstream", ["nginx", "-p", self.work, "-c", conf], self.work)
        harness.wait_port(p["UP"], proc=ng)
        self.up_worker = harness.worker_pid(ng.pid)
        # Redis shares the proxy's core: if it were on the request path, it would cost there.
        rd = harness.spawn("redis", ["redis-server", "--port", str(p["REDIS"]), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", self.work], self.work)
        deadline = time.time() + 15
        while not redis_ping(p["REDIS"]):
            if rd.poll() is not None or time.time() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.redis_pid = rd.pid
        self.procs = {}
        for store in STORES:
            self.procs[store] = self.start_tollgate(store)
            self.pids[store] = self.procs[store].pid
        for store in STORES:
            self.sanity(store)
        log(f"upstream nginx worker {self.up_worker}, redis {self.redis_pid}, tollgate memory {self.pids['memory']}, "
            f"tollgate redis {self.pids['redis']}")

    def conf_path(self, store, redis_timeout="500ms"):
        path = harness.render("tollgate.toml", os.path.join(self.work, f"tollgate-{store}.toml"),
                              PORT=self.ports[store], ADMIN_PORT=self.ports[f"{store}_admin"],
                              IDP_PORT=self.ports["IDP"], TOKEN_PATH="/token", UP_PORT=self.ports["UP"])
        with open(path, "a") as f:
            f.write(self.store_table(store, redis_timeout))
        return path

    def start_tollgate(self, store, prefix=(), name=None, ready_timeout=30, redis_timeout="500ms"):
        conf = self.conf_path(store, redis_timeout)
        p = harness.spawn(name or f"tollgate-{store}", list(prefix) + [self.a.tollgate, "run", "--config", conf],
                          self.work, env={"TOLLGATE_LOG": "warn"})
        harness.wait_port(self.ports[store], timeout=ready_timeout, proc=p)
        harness.wait_http_200(f"http://127.0.0.1:{self.ports[store + '_admin']}/readyz", timeout=ready_timeout)
        return p

    def sanity(self, store, timeout=30):
        """The upstream receives the token through the proxy."""
        st, body = harness.http_get_retrying(f"http://127.0.0.1:{self.ports[store]}/__auth", timeout)
        if st != 200 or body != harness.AUTH_VALUE.encode():
            raise RuntimeError(f"tollgate ({store}): the upstream did not see the expected Authorization header")

    def wait_quiet(self):
        """Bounded wait until other un-niced processes use < 0.15 core for 3 s."""
        limit = min(self.a.quiet_wait, self.a.noise_budget - self.noise_spent)
        if limit <= 0:
            return
        t0 = time.time()
        quiet = 0
        prev = [harness.cpu_core_busy(c) for c in (PROXY_CORE, LOAD_CORE)]
        while time.time() - t0 < limit:
            time.sleep(1.0)
            cur = [harness.cpu_core_busy(c) for c in (PROXY_CORE, LOAD_CORE)]
            busy = sum((c[0] - c[2]) - (q[0] - q[2]) for c, q in zip(cur, prev)) / CLK_TCK
            prev = cur
            quiet = quiet + 1 if busy < 0.15 else 0
            if quiet >= 3:
                break
        self.noise_spent += time.time() - t0

    def step(self, store, rnd):
        port, admin = self.ports[store], self.ports[store + "_admin"]
        pids = {"proxy": self.pids[store], "upstream": self.up_worker, "redis": self.redis_pid}
        retries = 0
        while True:
            self.wait_quiet()
            before = counters(admin)
            cmds0 = redis_commands(self.ports["REDIS"])
            with harness.Sampler(pids) as s:
                res = harness.run_wrk(port, self.a.conns, self.a.duration)
            cmds1 = redis_commands(self.ports["REDIS"])
            after = counters(admin)
            res.update(s.result())
            noisy = res["core0_total_s"] and res["core0_foreign_s"] > self.a.noise_limit * res["core0_total_s"]
            if not noisy or retries >= self.a.noise_retries or self.noise_spent >= self.a.noise_budget:
                break
            retries += 1
            self.noise_spent += s.t1 - s.t0
            log(f"r{rnd} {store}: other processes took {res['core0_foreign_s']:.2f}s of core 0; repeating")
        res.pop("raw", None)
        n = res["requests"]
        res.update({
            "store": store, "round": rnd, "retries": retries,
            "proxy_cpu_us_per_req": res["cpu_s"]["proxy"] * 1e6 / n if n else None,
            "upstream_cpu_us_per_req": res["cpu_s"]["upstream"] * 1e6 / n if n else None,
            "redis_cpu_s": res["cpu_s"]["redis"],
            "proxied": after["requests"] - before["requests"],
            "token_fetches": after["token_fetches"] - before["token_fetches"],
            "redis_round_trips": after["redis_round_trips"] - before["redis_round_trips"],
            "redis_errors": after["redis_errors"] - before["redis_errors"],
            # minus the INFO that read the first number
            "redis_commands": None if cmds0 is None or cmds1 is None else cmds1 - cmds0 - 1,
        })
        log(f"r{rnd} {store:6s}: {res['rps']:,.0f} req/s, proxy {res['proxy_cpu_us_per_req']:.1f} µs/req, "
            f"{res['redis_round_trips']:.0f} Redis round trips, {res['errors']} errors")
        self.data["steps"].append(res)

    def rounds(self):
        for store in STORES:  # warm-up: connections, pools, allocator
            harness.run_wrk(self.ports[store], self.a.conns, 2)
        for rnd in range(1, self.a.rounds + 1):
            order = STORES if rnd % 2 else tuple(reversed(STORES))
            for store in order:
                self.step(store, rnd)
        for store in STORES:
            self.data.setdefault("rss_kib", {})[store] = harness.vm_hwm_kib(self.pids[store])

    # -- callgrind ---------------------------------------------------------------

    def callgrind(self):
        """Instructions under callgrind, for each store: first an idle window (what the
        process does on its own per second: timers, the Redis store's keep-alive PING),
        then, after a warm-up, a fixed number of requests on one keep-alive connection.
        Counters are zeroed before and dumped after each window (callgrind_control)."""
        for store in STORES:  # the measured processes are done; the doubles stay
            harness.stop(self.procs.pop(store))
        out = {}
        for store in STORES:
            # Fresh ports: the old ones may have been reused as ephemeral ports meanwhile.
            self.ports[store], self.ports[store + "_admin"] = free_ports(2)
            prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.work}/callgrind.{store}.%p"]
            # Under valgrind everything runs ~50x slower: a longer bound on Redis operations,
            # so that the store does not time out and fall back (which would not be the
            # request path we mean to measure).
            p = self.start_tollgate(store, prefix=prefix, name=f"callgrind-{store}", ready_timeout=180,
                                    redis_timeout="10s")
            port, admin = self.ports[store], self.ports[store + "_admin"]
            try:
                self.sanity(store, timeout=180)
                self.keepalive_requests(port, self.a.callgrind_warmup)
                idle_ir, idle_s = self.callgrind_window(p.pid, store, lambda: time.sleep(self.a.callgrind_idle))
                before = counters(admin)
                ir, elapsed = self.callgrind_window(p.pid, store, lambda: self.keepalive_requests(port, self.a.callgrind))
                after = counters(admin)
            except Exception as e:
                raise RuntimeError(f"callgrind ({store}): {e}\n{self.log_tail(f'callgrind-{store}')}") from e
            finally:
                harness.stop(p, timeout=60)
            n = self.a.callgrind
            idle_rate = idle_ir / idle_s if idle_ir is not None else None
            out[store] = {
                "requests": n,
                "instructions": ir,
                "elapsed_s": elapsed,
                "instructions_per_request": ir / n if ir else None,
                "idle_instructions_per_s": idle_rate,
                "instructions_per_request_net": (ir - idle_rate * elapsed) / n if ir and idle_rate is not None else None,
                "token_fetches": after["token_fetches"] - before["token_fetches"],
                "redis_round_trips": after["redis_round_trips"] - before["redis_round_trips"],
            }
            log(f"callgrind {store}: {out[store]['instructions_per_request'] or 0:,.0f} instructions/request, "
                f"idle {idle_rate or 0:,.0f}/s ({out[store]['redis_round_trips']:.0f} Redis round trips)")
        return out

    def callgrind_window(self, pid, store, body):
        """Zero the counters, run `body`, dump; (instructions in the dump, seconds)."""
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
        t0 = time.time()
        body()
        elapsed = time.time() - t0
        before = set(glob.glob(f"{self.work}/callgrind.{store}.{pid}.*"))
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=120)
        new = sorted(set(glob.glob(f"{self.work}/callgrind.{store}.{pid}.*")) - before, key=os.path.getmtime)
        return (read_ir(new[-1]) if new else None), elapsed

    def log_tail(self, name, n=15):
        try:
            with open(os.path.join(self.work, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    @staticmethod
    def keepalive_requests(port, n, timeout=600):
        deadline = time.time() + timeout
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(n):
                if time.time() > deadline:
                    raise RuntimeError("callgrind load took too long")
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status} under callgrind")
        finally:
            c.close()

    def run(self):
        try:
            self.start()
            self.rounds()
            if self.a.callgrind:
                self.data["callgrind"] = self.callgrind()
        finally:
            harness.stop_all()
            if not self.a.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)
            else:
                log(f"work directory kept: {self.work}")
        self.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.data["noise_spent_s"] = round(self.noise_spent)
        return self.data


def read_ir(path):
    with open(path) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    return None


# --------------------------------------------------------------------------- report


def noise_line(steps, core):
    """What else ran on the proxy's core during the load steps (the report's noise line)."""
    retried = sum(x.get("retries", 0) for x in steps)
    foreign = [x["core0_foreign_s"] / x["core0_total_s"] for x in steps if x.get("core0_total_s")]
    comp = sum(1 for x in steps if x.get("compilers"))
    return (f"Noise: {comp} of {len(steps)} load steps overlapped with a compiler process; other un-niced processes "
            f"used a median {fmt(100 * med(foreign) if foreign else None, 1)} % of core {core} (max "
            f"{fmt(100 * max(foreign) if foreign else None, 1)} %); {retried} step(s) repeated.")


def summary(count, cost):
    """The numbers the reading is made of (also stored in the raw JSON)."""
    s = {"count": {}, "cost": {}}
    if count:
        for r in count["runs"]:
            s["count"].setdefault(r["store"], {})[str(r["replicas"])] = {
                "token_requests": r["token_requests"], "cycles": r["cycles"], "per_cycle": r["per_cycle"],
                "max_per_cycle": r["max_per_cycle"], "client_failed": r["client_failed"],
                "upstream_rejected": r["upstream_rejected"], "fallbacks": r["totals"].get("fallbacks", 0),
                "redis_errors": r["totals"].get("redis_errors", 0),
                "cpu_cores_other_processes": r.get("cpu_cores_other_processes")}
    if cost:
        for store in STORES:
            st = [x for x in cost["steps"] if x["store"] == store]
            s["cost"][store] = {
                "rps": med([x["rps"] for x in st]),
                "proxy_cpu_us_per_req": med([x["proxy_cpu_us_per_req"] for x in st]),
                "redis_round_trips": sum(x["redis_round_trips"] for x in st),
                "cpu_range": (min(x["proxy_cpu_us_per_req"] for x in st), max(x["proxy_cpu_us_per_req"] for x in st)),
                "requests": sum(x["requests"] for x in st),
            }
        m, r = s["cost"]["memory"], s["cost"]["redis"]
        s["cost"]["cpu_ratio"] = (r["proxy_cpu_us_per_req"] / m["proxy_cpu_us_per_req"]
                                  if m["proxy_cpu_us_per_req"] else None)
        s["cost"]["rps_ratio"] = r["rps"] / m["rps"] if m["rps"] else None
        cg = cost.get("callgrind") or {}
        if cg.get("memory", {}).get("instructions_per_request") and cg.get("redis", {}).get("instructions_per_request"):
            s["cost"]["instructions_ratio"] = (cg["redis"]["instructions_per_request"]
                                               / cg["memory"]["instructions_per_request"])
        if cg.get("memory", {}).get("instructions_per_request_net") and cg.get("redis", {}).get(
                "instructions_per_request_net"):
            s["cost"]["instructions_ratio_net"] = (cg["redis"]["instructions_per_request_net"]
                                                   / cg["memory"]["instructions_per_request_net"])
    return s


def report(count, cost, facts, label):
    out = []
    w = out.append
    s = summary(count, cost)
    w(f"# tollgate fleet benchmark — {label}")
    w("")
    w("Produced by `bench/fleet.sh`. Part 1 counts token requests for fleets of replicas sharing a Redis store; "
      "part 2 compares the request path with the memory store and with the Redis store.")
    w("")
    machine_section(w, facts)

    if count:
        runs = count["runs"]
        w("## 1. Token requests per refresh cycle")
        w("")
        w(f"Each run starts a fresh `redis-server` (Redis runs only), the token-endpoint double of `tollgate-testkit` "
          f"issuing tokens that live {count['lifetime_s']:g} s, the upstream double (it accepts only unexpired tokens of "
          f"that endpoint), and N `tollgate run` processes (`{os.path.relpath(count['tollgate'], REPO) if os.path.isabs(count['tollgate']) else count['tollgate']}`, "
          f"`proxy.threads = 1`, `refresh_before = \"{count['refresh_before_s']:g}s\"`, "
          f"`expiry_margin = \"{count['expiry_margin_s']:g}s\"`) with identical configs apart from their ports, all "
          f"started at once. Every replica gets {count['rate_per_replica']:g} client requests/s from the cold start on, "
          f"for {count['lifetimes']} token lifetimes ({count['lifetime_s'] * count['lifetimes']:g} s) and then until the "
          f"next refresh cycle is over (a token request, then none for {runs[0]['cycle_gap_s'] / 2:g} s), so that a run "
          "ends between two cycles and every replica has seen the same number.")
        w("")
        w("- **token requests**: what the token endpoint double received during the run (cold start included).")
        w("- **cycles**: token generations a replica went through = tokens it put in use "
          "(`tollgate_token_source_total`, fetched + shared + restored), median over the replicas.")
        w("- **per cycle** = token requests ÷ cycles.")
        w("- **max in one cycle**: the token requests are grouped by time (a gap longer than "
          f"{runs[0]['cycle_gap_s']:g} s starts a new group); the largest group.")
        w("- **fetched / shared**: tokens the replicas obtained themselves / adopted from another replica through Redis, "
          "summed over the fleet (`tollgate_token_source_total`).")
        w("")
        stores = [st for st in ("redis", "memory") if any(r["store"] == st for r in runs)]
        sizes = sorted({r["replicas"] for r in runs})
        hdr = ["replicas"]
        for st in stores:
            name = "Redis" if st == "redis" else "memory"
            hdr += [f"{name}: token requests", f"{name}: cycles", f"{name}: per cycle", f"{name}: max in one cycle"]
        hdr += ["Redis: fetched / shared", "failed client requests", "client requests with an expired token",
                "other processes' CPU, cores"]
        w("| " + " | ".join(hdr) + " |")
        w("|" + "---|" * len(hdr))
        for n in sizes:
            row = [str(n)]
            failed, rejected, others, fs = [], [], [], "–"
            for st in stores:
                r = next((x for x in runs if x["store"] == st and x["replicas"] == n), None)
                if r is None:
                    row += ["–"] * 4
                    continue
                row += [str(r["token_requests"]), fmt(r["cycles"], 0 if float(r["cycles"]).is_integer() else 1),
                        fmt(r["per_cycle"], 2), str(r["max_per_cycle"])]
                failed.append(f"{r['client_failed']} of {r['client_ok'] + r['client_failed']}")
                rejected.append(str(r["upstream_rejected"]))
                others.append(fmt(r.get("cpu_cores_other_processes"), 2))
                if st == "redis":
                    fs = f"{r['totals'].get('fetched', 0):.0f} / {r['totals'].get('shared', 0):.0f}"
            row += [fs, " / ".join(failed), " / ".join(rejected), " / ".join(others)]
            w("| " + " | ".join(row) + " |")
        w("")
        w("*Other processes' CPU*: the machine's un-niced CPU time during the run minus that of the run's own "
          "processes (replicas, redis-server, the driver with its doubles and client traffic), in cores; the machine "
          f"has {os.cpu_count()}. Before each run the driver waits (at most {count.get('quiet_wait_s', 60):g} s) until "
          "other processes use less than 0.3 of a core.")
        w("")
        if len(stores) == 2:
            w("Where a column holds two values, they are Redis / memory.")
            w("")
        w("Token request times (s from the cold start), Redis store:")
        w("")
        for r in runs:
            if r["store"] == "redis":
                t = ", ".join(f"{x:.1f}" for x in r["token_request_times_s"])
                lease = r["totals"]
                w(f"- {r['replicas']} replica(s), run of {r['ran_s']:.1f} s: {t}  (leases acquired {lease.get('lease_acquired', 0):.0f}, "
                  f"busy {lease.get('lease_busy', 0):.0f}, lost {lease.get('lease_lost', 0):.0f}; "
                  f"fallbacks {lease.get('fallbacks', 0):.0f}; Redis errors {lease.get('redis_errors', 0):.0f})")
        w("")

    if cost:
        p = cost["params"]
        st = cost["steps"]
        c = s["cost"]
        w("## 2. Request path: memory store vs Redis store")
        w("")
        w(f"Two tollgate processes (`bench/conf/tollgate.toml`, `proxy.threads = 1`), identical apart from `[store]`: "
          f"`kind = \"memory\"` and `kind = \"redis\"` (a `redis-server` on loopback). The token endpoint (nginx) issues "
          f"a token that lives {p['token_lifetime_s']} s, so no refresh happens during the run. Both proxies, the "
          f"upstream nginx and redis-server run on core {p['proxy_core']}; wrk on core {p['load_core']}. "
          f"{p['rounds']} interleaved rounds (memory, Redis; then Redis, memory; …) of `wrk -t1 -c{p['conns']} "
          f"-d{p['duration_s']}s` after a 2 s warm-up of each. CPU µs/req = utime+stime delta of the proxy process from "
          "`/proc/<pid>/stat` ÷ requests completed in the step. The proxy's Redis operations = the change of "
          "`tollgate_redis_duration_seconds_count` (every store operation the process made) over the steps; "
          "commands redis-server processed = the change of its `total_commands_processed` over the steps, from any "
          "client (it includes the 1 s keep-alive `PING` of the Redis-store proxy's message stream, also during the "
          "memory store's steps).")
        w("")
        hdr = ["store", "req/s, median (min–max)", "proxy CPU µs/req, median (min–max)",
               "upstream CPU µs/req", "proxy's Redis operations during the load", "commands redis-server processed",
               "token requests during the load", "peak RSS MiB", "errors"]
        w("| " + " | ".join(hdr) + " |")
        w("|" + "---|" * len(hdr))
        for store in STORES:
            xs = [x for x in st if x["store"] == store]
            rss = (cost.get("rss_kib") or {}).get(store)
            w("| " + " | ".join([
                "Redis" if store == "redis" else "memory",
                rng([x["rps"] for x in xs]),
                rng([x["proxy_cpu_us_per_req"] for x in xs], 1),
                fmt(med([x["upstream_cpu_us_per_req"] for x in xs]), 1),
                f"{sum(x['redis_round_trips'] for x in xs):.0f} in {sum(x['requests'] for x in xs):,} requests",
                fmt(sum(x["redis_commands"] or 0 for x in xs)),
                f"{sum(x['token_fetches'] for x in xs):.0f}",
                fmt(rss / 1024 if rss else None, 1),
                str(sum(x["errors"] for x in xs)),
            ]) + " |")
        w("")
        w(f"**Redis ÷ memory**: proxy CPU per request {fmt(c.get('cpu_ratio'), 3)}×, throughput "
          f"{fmt(c.get('rps_ratio'), 3)}×.")
        w("")
        cg = cost.get("callgrind")
        if cg:
            w("Callgrind (valgrind): each store's tollgate started under `valgrind --tool=callgrind`; after a "
              "warm-up, counters are zeroed, a fixed number of requests is sent on one keep-alive connection and the "
              "counters are dumped (`callgrind_control -z` / `-d`). Instructions of the whole process (all "
              "threads). Before that, an idle window measures what the process does on its own per second "
              "(timers; with the Redis store, the message stream's keep-alive `PING`); *net* subtracts that idle "
              "rate over the request window.")
            w("")
            w("| store | requests | instructions per request | idle instructions per s | net instructions per request "
              "| proxy's Redis operations | token requests |")
            w("|---|---|---|---|---|---|---|")
            for store in STORES:
                x = cg.get(store) or {}
                w(f"| {'Redis' if store == 'redis' else 'memory'} | {x.get('requests', '–')} | "
                  f"{fmt(x.get('instructions_per_request'))} | {fmt(x.get('idle_instructions_per_s'))} | "
                  f"{fmt(x.get('instructions_per_request_net'))} | {fmt(x.get('redis_round_trips'))} | "
                  f"{fmt(x.get('token_fetches'))} |")
            w("")
            w(f"**Redis ÷ memory**: instructions per request {fmt(c.get('instructions_ratio'), 3)}× "
              f"(net {fmt(c.get('instructions_ratio_net'), 3)}×).")
            w("")
        w(noise_line(st, p["proxy_core"]))
        w("")

    w("## Reading")
    w("")
    for line in reading(s):
        w(f"- {line}")
    w("")
    return "\n".join(out)


def reading(s):
    """Sentences computed from the numbers, so the reading cannot drift from the tables."""
    lines = []
    red = s["count"].get("redis", {})
    mem = s["count"].get("memory", {})
    if red:
        sizes = sorted(red, key=int)
        per = [red[n]["per_cycle"] for n in sizes]
        mx = max(red[n]["max_per_cycle"] for n in sizes)
        fell = [n for n in sizes if red[n]["fallbacks"]]
        lines.append(
            f"Redis store: {min(per):.2f}–{max(per):.2f} token requests per refresh cycle for "
            f"{', '.join(sizes)} replicas; at most {mx} in any one cycle. "
            + ("The fleet makes one token request per cycle whatever its size."
               if mx == 1 else "Some cycles cost more than one token request (see the request times above)."))
        for n in fell:
            lines.append(
                f"In the {n}-replica Redis run, {red[n]['redis_errors']:.0f} Redis operations failed or timed out and "
                f"replicas fetched on their own {red[n]['fallbacks']:.0f} times (other processes used "
                f"{fmt(red[n]['cpu_cores_other_processes'], 2)} cores meanwhile): the designed fallback when the shared "
                "store does not answer in time; it costs token requests, never client requests.")
    if mem:
        sizes = sorted(mem, key=int)
        lines.append("Memory store (every replica on its own): "
                     + ", ".join(f"{n} replica(s) → {mem[n]['per_cycle']:.2f}" for n in sizes)
                     + " token requests per cycle"
                     + (": one per replica per cycle." if all(abs(mem[n]["per_cycle"] - int(n)) < 1e-9 for n in sizes)
                        else "."))
    failed = sum(v["client_failed"] for st in s["count"].values() for v in st.values())
    rejected = sum(v["upstream_rejected"] for st in s["count"].values() for v in st.values())
    if s["count"]:
        lines.append(f"Client requests that failed in all count runs: {failed}; requests the upstream received "
                     f"with an expired or unknown token: {rejected}.")
    c = s["cost"]
    if c:
        rt = c["redis"]["redis_round_trips"]
        lo_m, hi_m = c["memory"]["cpu_range"]
        lo_r, hi_r = c["redis"]["cpu_range"]
        overlap = lo_r <= hi_m and lo_m <= hi_r
        lines.append(
            f"Request path: the Redis-store proxy spent {c['redis']['proxy_cpu_us_per_req']:.1f} µs of CPU per request, "
            f"the memory-store proxy {c['memory']['proxy_cpu_us_per_req']:.1f} µs (ratio {c['cpu_ratio']:.3f}); "
            f"throughput ratio {c['rps_ratio']:.3f}. "
            + ("The per-round ranges overlap: no difference beyond run-to-run noise." if overlap else
               "The per-round ranges do not overlap."))
        if rt == 0:
            lines.append(f"The Redis-store proxy made no Redis operation while serving {c['redis']['requests']:,} "
                         "requests: the shared store is not on the request path (the token is read from the "
                         "process's memory with either store; Redis is used only when a token is obtained, "
                         "refreshed or invalidated).")
        else:
            lines.append(f"The Redis-store proxy made {rt:.0f} Redis operations while serving "
                         f"{c['redis']['requests']:,} requests ({1000 * rt / c['redis']['requests']:.3f} per 1,000).")
        if "instructions_ratio" in c:
            net = c.get("instructions_ratio_net")
            lines.append(f"Callgrind: instructions per request Redis ÷ memory = {c['instructions_ratio']:.3f}"
                         + (f" ({net:.3f} once each process's idle background is subtracted)." if net else "."))
    return lines


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="fleet")
    ap.add_argument("--tollgate", default=os.path.join(REPO, "target/release/tollgate"))
    ap.add_argument("--fleet-count", default=os.path.join(REPO, "target/debug/examples/fleet_count"),
                    help="the examples/fleet_count binary")
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--facts", help="machine facts JSON (written by fleet.sh)")
    ap.add_argument("--replicas", default="1,2,4,8,16")
    ap.add_argument("--lifetime", type=float, default=4.0, help="token lifetime for the count, s")
    ap.add_argument("--lifetimes", type=int, default=5, help="token lifetimes each count run lasts")
    ap.add_argument("--rate", type=float, default=10.0, help="client requests/s per replica in the count")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--callgrind", type=int, default=2000,
                    help="requests measured under callgrind per store (0: skip; skipped without valgrind)")
    ap.add_argument("--callgrind-warmup", type=int, default=200)
    ap.add_argument("--callgrind-idle", type=float, default=5.0, help="seconds of the idle window under callgrind")
    ap.add_argument("--skip-count", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--quiet-wait", type=int, default=60)
    ap.add_argument("--noise-limit", type=float, default=0.10)
    ap.add_argument("--noise-retries", type=int, default=2)
    ap.add_argument("--noise-budget", type=int, default=600)
    ap.add_argument("--keep-work", action="store_true", help="keep configs and logs (printed at the end)")
    a = ap.parse_args()
    atexit.register(harness.stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    if a.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        log("valgrind not installed: skipping the callgrind comparison")
        a.callgrind = 0

    count = cost = None
    if not a.skip_count:
        tmp = tempfile.NamedTemporaryFile(prefix="fleet-count.", suffix=".json", delete=False)
        tmp.close()
        cmd = [a.fleet_count, "--tollgate", a.tollgate, "--replicas", a.replicas, "--lifetime", str(a.lifetime),
               "--lifetimes", str(a.lifetimes), "--rate", str(a.rate), "--quiet-wait", str(a.quiet_wait),
               "--out", tmp.name]
        if a.keep_work:
            cmd.append("--keep-work")
        log("part 1: " + " ".join(cmd))
        sizes = len(a.replicas.split(","))
        limit = 2 * sizes * (a.lifetime * a.lifetimes + 90)
        subprocess.run(cmd, check=True, timeout=limit)
        with open(tmp.name) as f:
            count = json.load(f)
        os.unlink(tmp.name)
    if not a.skip_cost:
        log("part 2: request path, memory store vs Redis store")
        cost = Cost(a).run()
    facts = {}
    if a.facts:
        with open(a.facts) as f:
            facts = json.load(f)
    raw = {"label": a.label, "facts": facts, "summary": summary(count, cost), "count": count, "cost": cost}
    with open(a.out_json, "w") as f:
        json.dump(raw, f, indent=1)
    with open(a.out_md, "w") as f:
        f.write(report(count, cost, facts, a.label))
    log(f"wrote {a.out_md} (raw: {a.out_json})")


if __name__ == "__main__":
    main()
