#!/usr/bin/env python3
"""tollgate benchmark harness (driven by bench/run.sh; see bench/README.md).

Starts a loopback nginx upstream + token endpoint, the proxies under test
(tollgate, bare pingora, nginx, HAProxy), and measures them interleaved:
round 1: A B C D E, round 2: A B C D E, ...  Everything is bounded in time
and request count, and only ever talks to 127.0.0.1.

Raw measurements go to a JSON file; bench/report.py renders the Markdown.
"""

import argparse
import atexit
import json
import os
import re
import resource
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
CLK_TCK = os.sysconf("SC_CLK_TCK")

PROXY_CORE = "0"  # proxy under test + upstream nginx
LOAD_CORE = "1"  # wrk / oha / strace

PORTS = {
    "UP": 18001,  # upstream nginx
    "IDP": 18002,  # token endpoint (same nginx instance, second server block)
    "C": 18003,  # bare pingora
    "D": 18004,  # nginx proxy
    "E": 18005,  # haproxy
    "B": 18006,  # tollgate (3600 s token)
    "R": 18007,  # tollgate (2 s token, refresh under load)
    "COLD": 18008,  # tollgate (fresh per cold-start burst)
    "F": 18009,  # optional: bare pingora, work_stealing = false
    "G": 18010,  # optional: bare pingora, upstream_keepalive_pool_size = 1024
}
ADMIN_OFFSET = 100

TARGET_NAMES = {
    "A": "direct (upstream nginx)",
    "B": "tollgate",
    "C": "bare pingora",
    "D": "nginx proxy",
    "E": "HAProxy",
    "F": "bare pingora, work_stealing=false",
    "G": "bare pingora, keep-alive pool 1024",
}
BARE_VARIANTS = {
    # Same idle upstream pool as tollgate's default (proxy.upstream_keepalive_pool_size).
    "C": {"BARE_PROXY_POOL_SIZE": "1024"},
    "F": {"BARE_PROXY_WORK_STEALING": "0"},
    "G": {"BARE_PROXY_POOL_SIZE": "1024"},
}

PROCS = []  # (name, Popen) started by us; stopped at exit by pid


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_token(n=807):
    """Deterministic opaque 807-byte token (base64url alphabet, no dots, so a
    proxy can't mistake it for a JWT and derive a different expiry)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    x = 0x2545F491
    out = []
    for _ in range(n):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out.append(alphabet[x & 63])
    return "".join(out)


TOKEN = make_token()
AUTH_VALUE = "Bearer " + TOKEN


# --------------------------------------------------------------------------- processes


def render(template, dest, **subs):
    with open(os.path.join(BENCH, "conf", template)) as f:
        text = f.read()
    for k, v in subs.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise SystemExit(f"unrendered placeholders in {template}: {left}")
    with open(dest, "w") as f:
        f.write(text)
    return dest


def spawn(name, argv, work, env=None, core=PROXY_CORE):
    out = open(os.path.join(work, f"{name}.log"), "ab")
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.Popen(
        ["taskset", "-c", core] + argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=full_env,
        start_new_session=True,
    )
    PROCS.append((name, p))
    return p


def stop(p, timeout=15):
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)
    except ProcessLookupError:
        pass


def stop_all():
    for name, p in reversed(PROCS):
        stop(p)
    PROCS.clear()


def wait_port(port, timeout=30.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def http_get_retrying(url, timeout=30.0):
    """http_get, retried while the connection fails: pingora may close and reopen its
    listener between bootstrap and start (a long window under valgrind), so an open port
    alone does not mean it serves yet."""
    deadline = time.time() + timeout
    while True:
        try:
            return http_get(url)
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def wait_http_200(url, timeout=30.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            st, body = http_get(url)
            if st == 200:
                return True
            last = st
        except Exception as e:  # noqa: BLE001 - polling
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{url} not 200 after {timeout}s (last: {last})")


def child_pids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def worker_pid(master_pid, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = child_pids(master_pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise RuntimeError(f"no worker under nginx master {master_pid}")


# --------------------------------------------------------------------------- /proc sampling


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime = field 14, stime = field 15
    return int(fields[11]) + int(fields[12])


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_core_busy(core):
    """(busy_ticks, total_ticks, nice_ticks) for one core from /proc/stat.

    nice_ticks is user time of positively niced processes (other people's `nice -n 19`
    builds and fuzzers): they yield to our nice-0 processes, so they are reported
    separately from un-niced foreign load."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                return sum(v) - idle, sum(v), v[1]
    return 0, 0, 0


def foreign_compilers():
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                c = f.read().strip()
        except OSError:
            continue
        if c in ("rustc", "cc", "cc1", "ld", "cargo", "ld.lld", "clang"):
            n += 1
    return n


class Sampler:
    """CPU ticks of the processes of interest + core-0 busy time around one load step."""

    def __init__(self, pids):
        self.pids = {k: v for k, v in pids.items() if v}

    @staticmethod
    def children_cpu():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def __enter__(self):
        self.t0 = time.time()
        self.c0 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.core0 = cpu_core_busy(PROXY_CORE)
        self.lcore0 = cpu_core_busy(LOAD_CORE)
        self.kids0 = self.children_cpu()
        self.compilers0 = foreign_compilers()
        return self

    def __exit__(self, *exc):
        self.t1 = time.time()
        self.c1 = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.core1 = cpu_core_busy(PROXY_CORE)
        self.lcore1 = cpu_core_busy(LOAD_CORE)
        self.kids1 = self.children_cpu()
        self.compilers1 = foreign_compilers()
        return False

    def result(self):
        d = {k: (self.c1[k] - self.c0[k]) / CLK_TCK for k in self.pids}
        busy = (self.core1[0] - self.core0[0]) / CLK_TCK
        total = (self.core1[1] - self.core0[1]) / CLK_TCK
        niced = (self.core1[2] - self.core0[2]) / CLK_TCK
        ours = sum(d.values())
        return {
            "cpu_s": d,
            "core0_busy_s": busy,
            "core0_total_s": total,
            # core-0 CPU of other, un-niced processes (competes with the proxy on equal terms)
            "core0_foreign_s": max(0.0, busy - niced - ours),
            # core-0 CPU of other, niced processes (mostly fills idle time; yields to us)
            "core0_foreign_niced_s": niced,
            # the load generator's core: CPU of wrk/oha (our finished children) vs everything else
            "loadgen_cpu_s": self.kids1 - self.kids0,
            "core1_total_s": (self.lcore1[1] - self.lcore0[1]) / CLK_TCK,
            "core1_foreign_s": max(0.0, ((self.lcore1[0] - self.lcore0[0]) - (self.lcore1[2] - self.lcore0[2])) / CLK_TCK
                                   - (self.kids1 - self.kids0)),
            "core1_foreign_niced_s": (self.lcore1[2] - self.lcore0[2]) / CLK_TCK,
            "compilers": max(self.compilers0, self.compilers1),
            "loadavg": open("/proc/loadavg").read().split()[0],
        }


def stub_accepts():
    try:
        _, body = http_get(f"http://127.0.0.1:{PORTS['IDP']}/nginx_status")
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", body)
        return int(m.group(1)) if m else None
    except Exception:  # noqa: BLE001
        return None


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


# --------------------------------------------------------------------------- load tools


def parse_dur(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)?$", s)
    v = float(m.group(1))
    unit = m.group(2) or "s"
    return v * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def run_wrk(port, conns, duration, path="/"):
    cmd = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{duration}s",
        "--timeout", "5s", "--latency", f"http://127.0.0.1:{port}{path}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    out = p.stdout
    res = {"tool": "wrk", "conns": conns, "duration_s": duration, "raw": out[-2000:]}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError(f"wrk output unparsable: {out}\n{p.stderr}")
    res["requests"] = int(m.group(1))
    res["elapsed_s"] = parse_dur(m.group(2) + m.group(3))
    res["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs += int(m.group(1))
    res["errors"] = errs
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)", out, re.M)
        if m:
            res[f"closed_p{pct}_ms"] = parse_dur(m.group(1)) * 1e3
    return res


def oha_bin():
    p = shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
    return p if os.path.exists(p) else None


def _pct(d, key):
    """oha JSON percentiles are keyed like 'p50' / 'p99' / 'p99.9' (seconds)."""
    if d is None:
        return None
    v = d.get(key)
    return None if v is None else v * 1e3


def run_oha(port, args, timeout, path="/"):
    """Run oha with JSON output; returns parsed summary."""
    cmd = ["taskset", "-c", LOAD_CORE, oha_bin(), "--no-tui", "--output-format", "json", "--worker-threads", "1"]
    if "-z" in args:
        cmd.append("-w")  # let in-flight requests finish instead of counting them as errors
    cmd += args + [f"http://127.0.0.1:{port}{path}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"oha output unparsable (rc {p.returncode}): {p.stdout[-500:]} {p.stderr[-1000:]}")
    summ = j.get("summary", {})
    lat = j.get("latencyPercentiles") or {}
    codes = j.get("statusCodeDistribution") or {}
    errors = j.get("errorDistribution") or {}
    ok = int(codes.get("200", 0))
    total = sum(int(v) for v in codes.values()) + sum(int(v) for v in errors.values())
    return {
        "tool": "oha",
        "args": args,
        "requests": total,
        "ok": ok,
        "errors": total - ok,
        "status_codes": codes,
        "error_kinds": errors,
        "rps": summ.get("requestsPerSec"),
        "elapsed_s": summ.get("total"),
        "p50_ms": _pct(lat, "p50"),
        "p90_ms": _pct(lat, "p90"),
        "p99_ms": _pct(lat, "p99"),
        "p999_ms": _pct(lat, "p99.9"),
        "max_ms": None if summ.get("slowest") is None else summ["slowest"] * 1e3,
    }


# --------------------------------------------------------------------------- harness


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = tempfile.mkdtemp(prefix="tollgate-bench.")
        os.makedirs(os.path.join(self.work, "tmp"), exist_ok=True)
        self.data = {
            "label": args.label,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": {
                "rounds": args.rounds,
                "duration_s": args.duration,
                "conns": args.conns,
                "rate": args.rate,
                "rate_conns": args.rate_conns,
                "token_bytes": len(TOKEN),
                "auth_header_bytes": len(AUTH_VALUE),
                "proxy_core": PROXY_CORE,
                "load_core": LOAD_CORE,
                "targets": args.targets,
            },
            "steps": [],
            "rss_kib": {},
            "pids": {},
        }
        self.pids = {}  # target -> pid of the process doing the proxy work
        self.noise_spent = 0.0  # seconds spent waiting for quiet / repeating noisy steps
        self.procs = {}

    # -- setup --------------------------------------------------------------

    def start_upstream(self):
        conf = render("nginx-upstream.conf", os.path.join(self.work, "nginx-upstream.conf"),
                      WORK=self.work, TOKEN=TOKEN, UP_PORT=PORTS["UP"], IDP_PORT=PORTS["IDP"])
        p = spawn("nginx-upstream", ["nginx", "-p", self.work, "-c", conf], self.work)
        wait_port(PORTS["UP"], proc=p)
        self.up_master = p.pid
        self.up_worker = worker_pid(p.pid)
        log(f"upstream nginx master {p.pid} worker {self.up_worker} on :{PORTS['UP']}, token endpoint :{PORTS['IDP']}")

    def tollgate_conf(self, name, port, token_path):
        return render("tollgate.toml", os.path.join(self.work, f"{name}.toml"),
                      PORT=port, ADMIN_PORT=port + ADMIN_OFFSET, IDP_PORT=PORTS["IDP"],
                      TOKEN_PATH=token_path, UP_PORT=PORTS["UP"])

    def start_tollgate(self, name, port, token_path, wait_ready=True):
        conf = self.tollgate_conf(name, port, token_path)
        p = spawn(name, [self.a.tollgate, "run", "--config", conf], self.work,
                  env={"TOLLGATE_LOG": os.environ.get("BENCH_TOLLGATE_LOG", "warn")})
        wait_port(port, proc=p)
        if wait_ready:
            wait_http_200(f"http://127.0.0.1:{port + ADMIN_OFFSET}/readyz", timeout=30)
        return p

    def start_target(self, t):
        if t == "A":
            self.pids["A"] = None
            return
        if t == "B":
            p = self.start_tollgate("tollgate-B", PORTS["B"], "/token")
            self.pids["B"] = p.pid
        elif t in BARE_VARIANTS:
            p = spawn(f"bare-pingora-{t}", [self.a.bare_proxy, f"127.0.0.1:{PORTS[t]}", f"127.0.0.1:{PORTS['UP']}"],
                      self.work, env={"BARE_PROXY_AUTH": AUTH_VALUE, **BARE_VARIANTS[t]})
            wait_port(PORTS[t], proc=p)
            self.pids[t] = p.pid
        elif t == "D":
            conf = render("nginx-proxy.conf", os.path.join(self.work, "nginx-proxy.conf"),
                          WORK=self.work, TOKEN=TOKEN, UP_PORT=PORTS["UP"], PORT=PORTS["D"])
            p = spawn("nginx-proxy", ["nginx", "-p", self.work, "-c", conf], self.work)
            wait_port(PORTS["D"], proc=p)
            self.pids["D"] = worker_pid(p.pid)
            self.data["pids"]["D_master"] = p.pid
        elif t == "E":
            conf = render("haproxy.cfg", os.path.join(self.work, "haproxy.cfg"),
                          WORK=self.work, TOKEN=TOKEN, UP_PORT=PORTS["UP"], PORT=PORTS["E"])
            p = spawn("haproxy", ["haproxy", "-db", "-f", conf], self.work)
            wait_port(PORTS["E"], proc=p)
            self.pids["E"] = p.pid
        self.data["pids"][t] = self.pids[t]
        log(f"target {t} ({TARGET_NAMES[t]}) pid {self.pids[t]}")

    def port(self, t):
        return PORTS["UP"] if t == "A" else PORTS[t]

    def sanity(self, t):
        st, body = http_get(f"http://127.0.0.1:{self.port(t)}/__auth")
        want = b"" if t == "A" else AUTH_VALUE.encode()
        if st != 200 or body != want:
            raise RuntimeError(f"target {t}: upstream saw Authorization {body[:60]!r}... (len {len(body)}), want len {len(want)}")
        st, body = http_get(f"http://127.0.0.1:{self.port(t)}/")
        if st != 200 or b"bench-upstream" not in body:
            raise RuntimeError(f"target {t}: unexpected response {st} {body[:100]!r}")

    # -- measurement -----------------------------------------------------------

    def step(self, t, rnd, kind, fn):
        pids = {"proxy": self.pids.get(t), "upstream": self.up_worker}
        retries = 0
        while True:
            acc0 = stub_accepts()
            with Sampler(pids) as s:
                res = fn()
            acc1 = stub_accepts()
            res.update(s.result())
            noisy = (res["core0_total_s"] and res["core0_foreign_s"] > self.a.noise_limit * res["core0_total_s"]) or (
                res["core1_total_s"] and res["core1_foreign_s"] > self.a.noise_limit * res["core1_total_s"])
            if not noisy or retries >= self.a.noise_retries or self.noise_spent >= self.a.noise_budget:
                break
            retries += 1
            self.noise_spent += s.t1 - s.t0
            log(f"r{rnd} {t} {kind}: other processes took {res['core0_foreign_s']:.2f}s of core 0 / {res['core1_foreign_s']:.2f}s of core 1; repeating (retry {retries})")
            self.wait_quiet()
        res["retries"] = retries
        if not self.a.keep_raw:
            res.pop("raw", None)
        res.update({"target": t, "round": rnd, "kind": kind})
        if acc0 is not None and acc1 is not None:
            # minus the stub_status request itself
            res["upstream_conns_opened"] = acc1 - acc0 - 1
        n = res.get("requests") or 0
        if n:
            for k, v in res["cpu_s"].items():
                res[f"{k}_cpu_us_per_req"] = v * 1e6 / n
        self.data["steps"].append(res)
        lat = ""
        if res.get("p99_ms") is not None:
            lat = f" p50 {res['p50_ms']:.3f} ms p99 {res['p99_ms']:.3f} ms"
        cpu = " ".join(f"{k}={res.get(k + '_cpu_us_per_req', 0):.1f}us" for k in res["cpu_s"])
        log(f"r{rnd} {t} {kind:9s} {res.get('rps') or 0:9.0f} req/s n={n} err={res.get('errors')}{lat} cpu/req {cpu}"
            f" conns+{res.get('upstream_conns_opened')} foreign c0 {res['core0_foreign_s']:.2f}s c1 {res['core1_foreign_s']:.2f}s"
            f" (niced {res['core0_foreign_niced_s']:.2f}/{res['core1_foreign_niced_s']:.2f}s) loadgen {res['loadgen_cpu_s']:.2f}s")
        return res

    def wait_quiet(self):
        """Wait (bounded) until no compiler runs on the box, so rounds are comparable."""
        if self.a.quiet_wait <= 0 or self.noise_spent >= self.a.noise_budget:
            return
        t_start = time.time()
        try:
            self._wait_quiet(min(self.a.quiet_wait, self.a.noise_budget - self.noise_spent))
        finally:
            self.noise_spent += time.time() - t_start

    def _wait_quiet(self, limit):
        """Quiet = un-niced processes on the box used < 0.15 core for 3 s in a row; our own
        processes are idle between steps, so what is busy then is someone else's work."""
        deadline = time.time() + limit
        quiet = 0
        prev = [cpu_core_busy(c) for c in (PROXY_CORE, LOAD_CORE)]
        while time.time() < deadline:
            time.sleep(1.0)
            cur = [cpu_core_busy(c) for c in (PROXY_CORE, LOAD_CORE)]
            # un-niced CPU only: `nice -n 19` work yields to the benchmark
            busy = sum((c[0] - c[2]) - (p[0] - p[2]) for c, p in zip(cur, prev)) / CLK_TCK
            prev = cur
            quiet = quiet + 1 if busy < 0.15 else 0
            if quiet >= 3:
                return
        log(f"box still busy (other processes) after {limit:.0f}s; measuring anyway (recorded per step)")

    def main_rounds(self):
        targets = self.a.targets
        for t in targets:
            self.start_target(t)
            self.sanity(t)
        for t in targets:  # warm-up: fill keep-alive pools, fault in memory
            run_wrk(self.port(t), max(self.a.conns), 2)
        for rnd in range(1, self.a.rounds + 1):
            self.wait_quiet()
            for t in targets:
                for c in self.a.conns:
                    self.step(t, rnd, f"wrk{c}", lambda: run_wrk(self.port(t), c, self.a.duration))
                    time.sleep(0.5)
                if oha_bin() and not getattr(self.a, "skip_rate", False):  # bench/fastpath.py: wrk only
                    self.step(t, rnd, "rate", lambda: run_oha(
                        self.port(t),
                        ["-z", f"{self.a.duration}s", "-q", str(self.a.rate), "-c", str(self.a.rate_conns),
                         "--latency-correction"],
                        timeout=self.a.duration + 60))
                    time.sleep(0.5)
        for t in targets:
            pid = self.pids.get(t)
            self.data["rss_kib"][t] = vm_hwm_kib(pid) if pid else None
        self.data["rss_kib"]["upstream_worker"] = vm_hwm_kib(self.up_worker)
        if "D_master" in self.data["pids"]:
            self.data["rss_kib"]["D_master"] = vm_hwm_kib(self.data["pids"]["D_master"])

    # -- syscalls --------------------------------------------------------------

    def strace_step(self, t):
        pid = self.pids.get(t)
        if not pid:
            return
        n = self.a.strace_requests
        outf = os.path.join(self.work, f"strace-{t}.txt")
        st = subprocess.Popen(["taskset", "-c", LOAD_CORE, "strace", "-c", "-f", "-q", "-o", outf, "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        PROCS.append((f"strace-{t}", st))
        time.sleep(1.0)  # let strace attach to all threads
        try:
            res = run_oha(self.port(t), ["-n", str(n), "-c", "64"], timeout=180)
        finally:
            st.send_signal(signal.SIGINT)
            try:
                st.wait(timeout=30)
            except subprocess.TimeoutExpired:
                st.kill()
        calls = {}
        total = 0
        with open(outf) as f:
            for line in f:
                parts = line.split()
                # % time, seconds, usecs/call, calls, [errors], syscall
                if len(parts) >= 5 and re.match(r"^[\d.]+$", parts[0]) and parts[-1] != "total":
                    try:
                        c = int(parts[3])
                    except ValueError:
                        continue
                    calls[parts[-1]] = c
                if parts and parts[-1] == "total":
                    total = int(parts[3])
        okn = res.get("ok") or n
        top = sorted(calls.items(), key=lambda kv: -kv[1])
        self.data.setdefault("strace", {})[t] = {
            "requests": okn,
            "total_per_req": total / okn if okn else None,
            "per_req": {k: v / okn for k, v in top},
        }
        log(f"strace {t}: {total / okn:.2f} syscalls/req; top " + ", ".join(f"{k} {v / okn:.2f}" for k, v in top[:5]))

    def perf_check(self):
        p = subprocess.run(["perf", "stat", "-x", ",", "-e", "instructions", "true"], capture_output=True, text=True)
        ok = p.returncode == 0 and "<not supported>" not in p.stderr and "<not counted>" not in p.stderr
        if ok:
            self.data["perf_instructions"] = "supported"
        elif "<not supported>" in p.stderr:
            self.data["perf_instructions"] = "not available (`perf stat -e instructions true` reports `<not supported>`: no PMU exposed to this VM)"
        else:
            self.data["perf_instructions"] = "not available (perf failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:120] + ")"
        return ok

    def perf_step(self, t):
        pid = self.pids.get(t)
        if not pid:
            return
        outf = os.path.join(self.work, f"perf-{t}.txt")
        pp = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "instructions", "-p", str(pid), "-o", outf],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        PROCS.append((f"perf-{t}", pp))
        time.sleep(0.5)
        res = run_oha(self.port(t), ["-n", str(self.a.strace_requests), "-c", "64"], timeout=120)
        pp.send_signal(signal.SIGINT)
        pp.wait(timeout=10)
        with open(outf) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and "instructions" in parts[2] and parts[0].isdigit():
                    self.data.setdefault("perf", {})[t] = int(parts[0]) / (res.get("ok") or 1)

    # -- cold start / refresh -------------------------------------------------------

    def cold_start(self):
        """N concurrent first requests against a fresh tollgate.

        idp = "fast": the token endpoint answers at once (tollgate may already hold the token
        when the burst lands). idp = "slow": the same endpoint trickles its response over ~2 s
        (nginx limit_rate), so every first request has to wait on the one in-flight fetch.
        """
        out = []
        for idp, path in (("fast", "/token-cold"), ("slow", "/token-slow")):
            if idp not in self.a.cold_idp:
                continue
            logf = os.path.join(self.work, f"token-{path.strip('/').split('-')[1]}.log")
            for n in self.a.cold_n:
                for rep in range(1, self.a.cold_reps + 1):
                    before = count_lines(logf)
                    t0 = time.time()
                    p = self.start_tollgate(f"tollgate-cold-{idp}-{n}-{rep}", PORTS["COLD"], path, wait_ready=False)
                    t_listen = time.time() - t0
                    burst_at = time.time()
                    res = run_oha(PORTS["COLD"], ["-n", str(n), "-c", str(n)], timeout=120)
                    time.sleep(0.5)  # let nginx write its access_log line
                    fetched = count_lines(logf) - before
                    # $msec (when nginx finished the token response) of this instance's fetches
                    done_at = []
                    with open(logf) as f:
                        for line in f.readlines()[before:]:
                            try:
                                done_at.append(float(line.split()[0]))
                            except (ValueError, IndexError):
                                pass
                    res.update({
                        "idp": idp, "n": n, "rep": rep, "token_requests": fetched,
                        "spawn_to_listen_ms": t_listen * 1e3,
                        "token_done_vs_burst_ms": (done_at[0] - burst_at) * 1e3 if done_at else None,
                        "rss_kib": vm_hwm_kib(p.pid),
                    })
                    # the same burst against the already-warm tollgate (B): the cost of the burst itself
                    if self.pids.get("B") and idp == "fast":
                        warm = run_oha(PORTS["B"], ["-n", str(n), "-c", str(n)], timeout=120)
                        res["warm"] = {k: warm[k] for k in ("p50_ms", "p99_ms", "max_ms", "ok", "errors", "error_kinds")}
                    stop(p)
                    out.append(res)
                    log(f"cold start idp={idp} N={n}: token requests {fetched} (done {res['token_done_vs_burst_ms']} ms after burst start), "
                        f"ok {res['ok']}/{n}, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms; "
                        f"warm p99 {res.get('warm', {}).get('p99_ms')} ms; errors {res['error_kinds']}")
                    time.sleep(2)
        self.data["cold_start"] = out

    def refresh_under_load(self):
        logf = os.path.join(self.work, "token-short.log")
        p = self.start_tollgate("tollgate-R", PORTS["R"], "/token-short")
        self.pids["R"] = p.pid
        self.data["pids"]["R"] = p.pid
        rows = []
        for rnd in range(1, self.a.rounds + 1):
            for t, port in (("B", PORTS["B"]), ("R", PORTS["R"])):
                logm = os.path.join(self.work, "token-main.log")
                b0, s0 = count_lines(logm), count_lines(logf)
                args = ["-z", f"{self.a.duration}s", "-q", str(self.a.rate), "-c", str(self.a.rate_conns), "--latency-correction"]
                res = self.step(t, rnd, "refresh", lambda: run_oha(port, args, timeout=self.a.duration + 60))
                time.sleep(0.5)
                res["token_requests"] = (count_lines(logm) - b0) if t == "B" else (count_lines(logf) - s0)
                rows.append(res)
                time.sleep(0.5)
        self.data["rss_kib"]["R"] = vm_hwm_kib(p.pid)
        stop(p)
        self.data["refresh"] = rows

    # -- main ---------------------------------------------------------------------

    def run(self):
        ulimit = subprocess.run(["bash", "-c", "ulimit -n"], capture_output=True, text=True).stdout.strip()
        self.data["params"]["ulimit_n"] = ulimit
        log(f"work dir {self.work}; proxies+upstream pinned to core {PROXY_CORE}, load generators to core {LOAD_CORE}; ulimit -n {ulimit}")
        self.start_upstream()
        self.sanity("A")
        try:
            if not self.a.skip_main:
                self.main_rounds()
            else:
                for t in self.a.targets:
                    self.start_target(t)
            if oha_bin() and "B" in self.a.targets and not self.a.skip_refresh:
                self.refresh_under_load()
            if oha_bin() and "B" in self.a.targets and not self.a.skip_cold:
                self.cold_start()
            if not self.a.skip_strace and oha_bin():
                for t in ("B", "C", "D", "E", "F", "G"):
                    if t in self.pids:
                        self.strace_step(t)
                        time.sleep(1)
            if self.perf_check() and oha_bin():
                for t in ("B", "C", "D", "E"):
                    if t in self.pids:
                        self.perf_step(t)
        finally:
            self.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.data["noise_spent_s"] = round(self.noise_spent)
            self.data["token_main_requests_total"] = count_lines(os.path.join(self.work, "token-main.log"))
            with open(self.a.out, "w") as f:
                json.dump(self.data, f, indent=1)
            log(f"raw results: {self.a.out}")
            stop_all()
            if not self.a.keep_work:
                shutil.rmtree(self.work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="run")
    ap.add_argument("--out", required=True, help="raw JSON output path")
    ap.add_argument("--tollgate", default=os.path.join(REPO, "target/release/tollgate"))
    ap.add_argument("--bare-proxy", default=os.path.join(REPO, "target/release/examples/bare_proxy"))
    ap.add_argument("--targets", default="ABCDE")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per load step")
    ap.add_argument("--conns", default="64,256", help="wrk connection counts")
    ap.add_argument("--rate", type=int, default=2000, help="fixed request rate for latency (oha -q)")
    ap.add_argument("--rate-conns", type=int, default=32)
    ap.add_argument("--cold-n", default="1000,10000")
    ap.add_argument("--cold-reps", type=int, default=1)
    ap.add_argument("--cold-idp", default="fast,slow", help="token endpoint variants for the cold start")
    ap.add_argument("--strace-requests", type=int, default=20000)
    ap.add_argument("--quiet-wait", type=int, default=120,
                    help="max seconds to wait for an idle box before each round / repeated step")
    ap.add_argument("--noise-limit", type=float, default=0.10,
                    help="repeat a step when other processes used more than this share of core 0")
    ap.add_argument("--noise-retries", type=int, default=2)
    ap.add_argument("--noise-budget", type=int, default=900,
                    help="total seconds the run may spend waiting for quiet or repeating noisy steps")
    ap.add_argument("--skip-main", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-refresh", action="store_true")
    ap.add_argument("--skip-strace", action="store_true")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--keep-raw", action="store_true")
    a = ap.parse_args()
    a.targets = [t for t in a.targets if t in TARGET_NAMES]
    a.conns = [int(x) for x in a.conns.split(",") if x]
    a.cold_n = [int(x) for x in a.cold_n.split(",") if x]
    a.cold_idp = [x for x in a.cold_idp.split(",") if x]
    if "B" in a.targets and not os.access(a.tollgate, os.X_OK):
        raise SystemExit(f"{a.tollgate} missing; build it or pass --targets without B")
    if set("CFG") & set(a.targets) and not os.access(a.bare_proxy, os.X_OK):
        raise SystemExit(f"{a.bare_proxy} missing")
    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(130))
    Bench(a).run()


if __name__ == "__main__":
    main()
