#!/usr/bin/env python3
"""Callgrind instructions per request, fast path on vs off (issue 13 prototype).

One nginx serves both the upstream (small JSON) and the token endpoint; two tollgates
(bench/conf/tollgate.toml's route, default `retry_on_status = [401]`; `proxy.fast_path`
true / false) run under valgrind in turn. Per tollgate: warm-up, an idle window
(timers), then N keep-alive GETs from one connection; instructions of the whole process
between `callgrind_control -z` and `-d`, minus the idle rate.

usage: bench/fastpath_cg.py BINARY [N]
"""
import glob, http.client, os, socket, subprocess, sys, tempfile, time

BIN = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def read_ir(path):
    with open(path) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    return None


def requests(port, n, path="/"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {body[:200]!r}")
    c.close()
    return body


def window(work, pid, tag, body):
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=120)
    t0 = time.time()
    body()
    dt = time.time() - t0
    before = set(glob.glob(f"{work}/cg.{tag}.{pid}.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=120)
    new = sorted(set(glob.glob(f"{work}/cg.{tag}.{pid}.*")) - before, key=os.path.getmtime)
    return read_ir(new[-1]), dt


def main():
    work = tempfile.mkdtemp(prefix="fastpath-cg-")
    os.makedirs(f"{work}/tmp", exist_ok=True)
    up = free_port()
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(f"""worker_processes 1; daemon off; master_process off; pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  keepalive_requests 100000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{up};
    location = /token {{ default_type application/json;
      return 200 '{{"access_token":"{"t" * 780}","token_type":"Bearer","expires_in":3600}}'; }}
    location / {{ default_type application/json; return 200 '{{"status":"ok","service":"bench-upstream","n":12345}}'; }}
  }} }}
""")
    ng = subprocess.Popen(["nginx", "-p", work, "-c", f"{work}/nginx.conf"])
    results = {}
    try:
        time.sleep(0.5)
        for mode in ("on", "off"):
            port, admin = free_port(), free_port()
            cfg = f"{work}/tollgate-{mode}.toml"
            with open(cfg, "w") as f:
                f.write(f"""[proxy]
listen = "127.0.0.1:{port}"
threads = 1
fast_path = {"true" if mode == "on" else "false"}
[admin]
listen = "127.0.0.1:{admin}"
[providers.bench]
kind = "oauth2"
token_url = "http://127.0.0.1:{up}/token"
client_id = "bench-client"
client_secret = "bench-secret"
[[routes]]
name = "all"
path_prefix = "/"
upstream = "http://127.0.0.1:{up}"
provider = "bench"
""")
            env = dict(os.environ, TOLLGATE_LOG="warn")
            p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.{mode}.%p",
                                  BIN, "run", "--config", cfg], env=env,
                                 stdout=open(f"{work}/tg-{mode}.log", "w"), stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 180
                while True:
                    try:
                        requests(port, 1)
                        break
                    except Exception:
                        if time.time() > deadline:
                            raise
                        time.sleep(1)
                requests(port, 200)
                idle, idle_s = window(work, p.pid, mode, lambda: time.sleep(3))
                ir, dt = window(work, p.pid, mode, lambda: requests(port, N))
                net = (ir - idle / idle_s * dt) / N
                m = http.client.HTTPConnection("127.0.0.1", admin, timeout=30)
                m.request("GET", "/metrics")
                fp = [l for l in m.getresponse().read().decode().splitlines() if l.startswith("tollgate_fastpath_total")]
                results[mode] = (ir / N, net, dt, fp)
                print(f"fast_path={mode}: {ir / N:,.0f} instructions/request ({net:,.0f} net of idle), "
                      f"{N} requests in {dt:.1f}s; {fp}", flush=True)
            finally:
                p.terminate()
                p.wait(timeout=60)
        on, off = results["on"][1], results["off"][1]
        print(f"ratio on/off (net): {on / off:.3f}")
    finally:
        ng.terminate()
        ng.wait(timeout=10)


if __name__ == "__main__":
    main()
