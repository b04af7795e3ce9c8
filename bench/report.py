#!/usr/bin/env python3
"""Render bench/harness.py raw JSON (+ machine facts JSON) as Markdown."""

import json
import statistics
import sys

NAMES = {
    "A": "A direct (upstream nginx)",
    "B": "B tollgate",
    "C": "C bare pingora",
    "D": "D nginx proxy",
    "E": "E HAProxy",
    "R": "tollgate, 2 s token",
    "F": "F bare pingora, work_stealing=false",
    "G": "G bare pingora, keep-alive pool 1024",
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(v, nd=0, unit=""):
    if v is None:
        return "–"
    if nd == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{nd}f}{unit}"


def rng(xs, nd=0):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{f(med(xs), nd)} ({f(min(xs), nd)}–{f(max(xs), nd)})"


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{nd}f}×"


def machine_section(w, facts):
    """The `## Machine` section every bench report opens with: one line per fact."""
    w("## Machine")
    w("")
    for k, v in facts.items():
        w(f"- **{k}**: {v}")
    w("")


def main(raw_path, facts_path):
    d = json.load(open(raw_path))
    facts = json.load(open(facts_path))
    p = d["params"]
    steps = d["steps"]
    targets = p["targets"]
    conns = p["conns"]
    out = []
    w = out.append

    def sel(t, kind):
        return [s for s in steps if s["target"] == t and s["kind"] == kind]

    w(f"# tollgate benchmark — {d['label']}")
    w("")
    w(f"Run {d['started_utc']} → {d.get('finished_utc', '?')}, produced by `bench/run.sh {d['label']}`.")
    w("")
    w("## Machine and setup")
    w("")
    for k, v in facts.items():
        w(f"- **{k}**: {v}")
    w(f"- **CPU pinning**: proxy under test + upstream nginx on core {p['proxy_core']} (`taskset -c {p['proxy_core']}`); "
      f"load generator (wrk / oha / strace) on core {p['load_core']}. Every proxy runs 1 worker thread "
      "(tollgate `proxy.threads = 1`, pingora `threads: 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`).")
    w(f"- **Authorization header**: `Bearer ` + {p['token_bytes']}-byte opaque token = {p['auth_header_bytes']}-byte value, "
      "identical for B–E; the upstream echoes it back in a pre-run sanity check.")
    w(f"- **Load**: {p['rounds']} interleaved rounds ({' '.join(targets)} per round); per target and round "
      + ", ".join(f"`wrk -t1 -c{c} -d{p['duration_s']}s`" for c in conns)
      + f", then `oha -z {p['duration_s']}s -q {p['rate']} -c {p['rate_conns']} --latency-correction` (open loop, "
      "coordinated-omission corrected). 2 s warm-up per target before round 1.")
    w(f"- `ulimit -n` = {p.get('ulimit_n')}; perf instructions counter: {d.get('perf_instructions', '?')}")
    comp = [s for s in steps if s.get("compilers")]
    retried = sum(s.get("retries", 0) for s in steps)
    foreign = [s["core0_foreign_s"] / s["core0_total_s"] for s in steps if s.get("core0_total_s")]
    niced = [s.get("core0_foreign_niced_s", 0) / s["core0_total_s"] for s in steps if s.get("core0_total_s")]
    lg = [s["core1_foreign_s"] / s["core1_total_s"] for s in steps if s.get("core1_total_s")]
    w(f"- **Noise**: the box is shared; {len(comp)} of {len(steps)} load steps overlapped with a compiler process. "
      f"Other *niced* processes (`nice -n 19` builds/fuzzers, which yield to the benchmark) used a median "
      f"{f(100 * med(niced) if niced else None, 1)} % of core 0 (mostly its idle time). "
      f"Other *un-niced* processes used a median {f(100 * med(foreign) if foreign else None, 1)} % of core 0 "
      f"(max {f(100 * max(foreign) if foreign else None, 1)} %) and a median {f(100 * med(lg) if lg else None, 1)} % of the "
      f"load generator's core 1 (max {f(100 * max(lg) if lg else None, 1)} %); {retried} step(s) were repeated because "
      "un-niced processes took more than 10 % of either core (the last attempt is kept; "
      f"{d.get('noise_spent_s', '?')} s spent waiting/repeating). Read min–max ranges with that in mind.")
    w("")

    # ---------------- main table
    w("## Throughput, latency, CPU, memory")
    w("")
    hdr = ["target"]
    for c in conns:
        hdr.append(f"req/s @{c} conns, median (min–max)")
    hdr += [f"p50 / p99 ms @{p['rate']}/s", "proxy CPU µs/req @64 (@rate)", "upstream CPU µs/req @64 (@rate)",
            f"upstream conns opened per @{conns[-1]} step", "peak RSS MiB", "errors"]
    w("| " + " | ".join(hdr) + " |")
    w("|" + "---|" * len(hdr))
    summary = {}
    for t in targets:
        row = [NAMES[t]]
        s_rate = sel(t, "rate")
        summ = {}
        for c in conns:
            xs = [s["rps"] for s in sel(t, f"wrk{c}")]
            row.append(rng(xs))
            summ[f"rps{c}"] = med(xs)
        p50 = med([s.get("p50_ms") for s in s_rate])
        p99 = med([s.get("p99_ms") for s in s_rate])
        row.append(f"{f(p50, 3)} / {f(p99, 3)}")
        c0 = conns[0]
        pc = med([s.get("proxy_cpu_us_per_req") for s in sel(t, f"wrk{c0}")])
        pcr = med([s.get("proxy_cpu_us_per_req") for s in s_rate])
        uc = med([s.get("upstream_cpu_us_per_req") for s in sel(t, f"wrk{c0}")])
        ucr = med([s.get("upstream_cpu_us_per_req") for s in s_rate])
        if t == "A":
            row.append("– (no proxy)")
        else:
            row.append(f"{f(pc, 1)} ({f(pcr, 1)})")
        row.append(f"{f(uc, 1)} ({f(ucr, 1)})")
        row.append(rng([s.get("upstream_conns_opened") for s in sel(t, f"wrk{conns[-1]}")]))
        rss = d["rss_kib"].get(t) if t != "A" else d["rss_kib"].get("upstream_worker")
        row.append(f(rss / 1024 if rss else None, 1) + (" (worker)" if t in ("A", "D") else ""))
        errs = sum((s.get("errors") or 0) for s in steps if s["target"] == t and s["kind"] != "refresh")
        row.append(str(errs))
        summ.update({"pc": pc, "pcr": pcr, "uc": uc, "ucr": ucr, "p50": p50, "p99": p99})
        summary[t] = summ
        w("| " + " | ".join(row) + " |")
    w("")
    w("CPU µs/req = (utime+stime delta from `/proc/<pid>/stat`) ÷ requests completed in that step; "
      "for nginx the worker process. `@64` is the saturated wrk step with 64 connections, `(@rate)` the fixed-rate oha step. "
      "Upstream conns opened = delta of the upstream nginx `stub_status` accepts counter (keep-alive pool churn).")
    w("")

    # ---------------- ratios
    if "B" in summary:
        w("## Ratios (tollgate ÷ other)")
        w("")
        refs = [(x, NAMES[x]) for x in ("D", "C", "A", "E") if x in summary]
        w("| metric | " + " | ".join(f"tollgate / {n.split(' ', 1)[1]}" for _, n in refs) + " |")
        w("|---|" + "---|" * len(refs))
        B = summary["B"]
        for c in conns:
            w(f"| req/s @{c} | " + " | ".join(ratio(B[f"rps{c}"], summary[x][f"rps{c}"]) for x, _ in refs) + " |")
        w("| proxy CPU µs/req @64 | " + " | ".join(
            ratio(B["pc"], summary[x]["pc"]) if x != "A" else ratio((B["pc"] or 0) + (B["uc"] or 0), summary["A"]["uc"]) + " ¹"
            for x, _ in refs) + " |")
        w("| proxy CPU µs/req @rate | " + " | ".join(
            ratio(B["pcr"], summary[x]["pcr"]) if x != "A" else ratio(B["pcr"] + B["ucr"], summary["A"]["ucr"]) + " ¹"
            for x, _ in refs) + " |")
        w("| p99 @rate | " + " | ".join(ratio(B["p99"], summary[x]["p99"]) for x, _ in refs) + " |")
        w("")
        w("¹ vs direct: (tollgate + upstream CPU per request) ÷ (upstream CPU per request when hit directly) — total CPU cost of "
          "a request through tollgate relative to no proxy.")
        w("")

    # ---------------- refresh
    if d.get("refresh"):
        w("## Refresh under load")
        w("")
        w(f"oha open loop at {p['rate']} req/s for {p['duration_s']} s, interleaved per round: tollgate with a 3600 s token (B) vs "
          "tollgate whose token endpoint returns `expires_in: 2` (R, replaced ~every second).")
        w("")
        w("| instance | p50 ms | p99 ms | p99.9 ms | max ms | token fetches per run | non-200 / errors |")
        w("|---|---|---|---|---|---|---|")
        for t in ("B", "R"):
            rows = [r for r in d["refresh"] if r["target"] == t]
            w(f"| {NAMES[t] if t == 'R' else 'tollgate, 3600 s token'} | {rng([r.get('p50_ms') for r in rows], 3)} | "
              f"{rng([r.get('p99_ms') for r in rows], 3)} | {rng([r.get('p999_ms') for r in rows], 3)} | "
              f"{rng([r.get('max_ms') for r in rows], 2)} | {rng([r.get('token_requests') for r in rows])} | "
              f"{sum(r.get('errors') or 0 for r in rows)} |")
        w("")

    # ---------------- cold start
    if d.get("cold_start"):
        w("## Cold start")
        w("")
        w("A freshly spawned tollgate. As soon as its proxy port accepts a TCP connection, N concurrent first requests "
          "(`oha -n N -c N`, one request per connection). Token requests = lines the token location's access_log gained "
          "(must be 1). IdP *fast*: the nginx location answers at once. IdP *slow*: the same location trickles its response "
          "over about 2 s (`limit_rate`), so all N requests have to wait on the one in-flight fetch. "
          "Token done = when nginx finished the token response, relative to the start of the burst (negative: tollgate "
          "already held the token). *Warm* = the same burst against the long-running tollgate B, i.e. the cost of N "
          "simultaneous connects on their own.")
        w("")
        w("| IdP | N | token requests | token done ms | ok / N | p50 ms | p99 ms | max ms | warm p99 ms | spawn→listen ms | peak RSS MiB | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in d["cold_start"]:
            w(f"| {r.get('idp', 'fast')} | {r['n']:,} | **{r['token_requests']}** | {f(r.get('token_done_vs_burst_ms'), 0)} | "
              f"{r['ok']:,} / {r['n']:,} | {f(r.get('p50_ms'), 2)} | "
              f"{f(r.get('p99_ms'), 2)} | {f(r.get('max_ms'), 2)} | {f((r.get('warm') or {}).get('p99_ms'), 2)} | "
              f"{f(r.get('spawn_to_listen_ms'), 1)} | {f((r.get('rss_kib') or 0) / 1024, 1)} | "
              f"{json.dumps(r.get('error_kinds') or {})} |")
        w("")

    # ---------------- syscalls
    if d.get("strace"):
        w("## Syscalls per request")
        w("")
        st0 = next(iter(d["strace"].values()))
        w(f"`strace -c -f -p <pid>` attached during `oha -n {st0['requests']} -c 64` (closed loop, keep-alive). "
          "Counts ÷ successful requests; for nginx the worker.")
        w("")
        w("| proxy | total syscalls/req | top 5 (calls/req) |")
        w("|---|---|---|")
        for t, s in d["strace"].items():
            top = list(s["per_req"].items())[:5]
            w(f"| {NAMES[t]} | {f(s['total_per_req'], 2)} | " + ", ".join(f"`{k}` {v:.2f}" for k, v in top) + " |")
        w("")
        w("<details><summary>all syscalls per request</summary>")
        w("")
        for t, s in d["strace"].items():
            w(f"- {NAMES[t]}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["per_req"].items() if v >= 0.001))
        w("")
        w("</details>")
        w("")
    if d.get("perf"):
        w("## Instructions per request (perf stat)")
        w("")
        for t, v in d["perf"].items():
            w(f"- {NAMES[t]}: {v:,.0f}")
        w("")

    # ---------------- per-step raw
    w("<details><summary>per-step measurements</summary>")
    w("")
    w("| round | target | step | req/s | requests | errors | p50 ms | p99 ms | proxy CPU s | upstream CPU s | upstream conns | other procs' CPU s core 0 / core 1 (niced) | load-gen CPU s | compilers |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        w(f"| {s['round']} | {s['target']} | {s['kind']} | {f(s.get('rps'))} | {f(s.get('requests'))} | {s.get('errors')} | "
          f"{f(s.get('p50_ms', s.get('closed_p50_ms')), 3)} | {f(s.get('p99_ms', s.get('closed_p99_ms')), 3)} | "
          f"{f(s['cpu_s'].get('proxy'), 2)} | {f(s['cpu_s'].get('upstream'), 2)} | {s.get('upstream_conns_opened')} | "
          f"{f(s.get('core0_foreign_s'), 2)} / {f(s.get('core1_foreign_s'), 2)} "
          f"({f(s.get('core0_foreign_niced_s'), 2)} / {f(s.get('core1_foreign_niced_s'), 2)}) | {f(s.get('loadgen_cpu_s'), 2)} | "
          f"{s.get('compilers')} |")
    w("")
    w("wrk p50/p99 in this table are closed-loop (not corrected for coordinated omission); use the oha `rate` rows for latency.")
    w("")
    w("</details>")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
