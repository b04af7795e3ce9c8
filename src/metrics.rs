//! Prometheus metrics. One process-wide registry (not the `prometheus` crate's default
//! one, so nothing a dependency registers leaks into our exposition).

use std::sync::LazyLock;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub token_fetch_total: IntCounterVec,
    pub token_fetch_duration: HistogramVec,
    pub token_expiry_timestamp: GaugeVec,
    pub token_valid: IntGaugeVec,
    pub token_fetch_consecutive_failures: IntGaugeVec,
    pub provider_awaiting_code: IntGaugeVec,
    pub token_unavailable_total: IntCounterVec,
    pub fastpath_total: IntCounterVec,
    pub requests_total: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub config_reload_total: IntCounterVec,
    pub upstream_auth_rejected_total: IntCounterVec,
    pub upstream_insufficient_scope_total: IntCounterVec,
    pub upstream_challenges_total: IntCounterVec,
    pub store_errors_total: IntCounterVec,
    pub fleet_lease_total: IntCounterVec,
    pub fleet_fallback_total: IntCounterVec,
    pub token_source_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub redis_duration: HistogramVec,
    pub redis_errors_total: IntCounterVec,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// `tollgate_fastpath_total{path="fast",reason="served"}`, resolved once: it counts every
/// request the fast path serves, and a label lookup takes the vector's lock.
pub fn fastpath_served() -> &'static prometheus::IntCounter {
    static SERVED: LazyLock<prometheus::IntCounter> =
        LazyLock::new(|| get().fastpath_total.with_label_values(&["fast", "served"]));
    &SERVED
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
            registry.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition");
            registry.register(Box::new(g.clone())).expect("metric registered once");
            g
        };
        let hist = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("static metric definition");
            registry.register(Box::new(h.clone())).expect("metric registered once");
            h
        };
        let token_expiry_timestamp = GaugeVec::new(
            Opts::new(
                "tollgate_token_expiry_timestamp_seconds",
                "Unix time at which the provider's current token expires.",
            ),
            &["provider"],
        )
        .expect("static metric definition");
        registry.register(Box::new(token_expiry_timestamp.clone())).expect("metric registered once");

        let m = Metrics {
            token_fetch_total: counter(
                "tollgate_token_fetch_total",
                "Token requests to identity providers, by outcome (success or error class).",
                &["provider", "outcome"],
            ),
            token_fetch_duration: hist(
                "tollgate_token_fetch_duration_seconds",
                "Duration of token requests to identity providers.",
                &["provider"],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            token_expiry_timestamp,
            token_valid: igauge(
                "tollgate_token_valid",
                "1 when the provider holds a token that may be injected.",
                &["provider"],
            ),
            token_fetch_consecutive_failures: igauge(
                "tollgate_token_fetch_consecutive_failures",
                "Token requests that failed in a row since the last success.",
                &["provider"],
            ),
            provider_awaiting_code: igauge(
                "tollgate_provider_awaiting_code",
                "1 while the provider waits for a human to supply a one-time code.",
                &["provider"],
            ),
            token_unavailable_total: counter(
                "tollgate_token_unavailable_total",
                "Requests answered 503 because no valid token could be had in time.",
                &["provider"],
            ),
            fastpath_total: counter(
                "tollgate_fastpath_total",
                "Requests (path=fast) and connections handed to pingora (path=pingora), by reason.",
                &["path", "reason"],
            ),
            requests_total: counter(
                "tollgate_requests_total",
                "Proxied requests by route and response status.",
                &["route", "status"],
            ),
            upstream_duration: hist(
                "tollgate_upstream_duration_seconds",
                "Time from the start of a proxied request to the end of its response.",
                &["route"],
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            config_reload_total: counter(
                "tollgate_config_reload_total",
                "Configuration reloads by outcome.",
                &["outcome"],
            ),
            upstream_auth_rejected_total: counter(
                "tollgate_upstream_auth_rejected_total",
                "Upstream responses rejecting the injected token (401), by route.",
                &["route"],
            ),
            upstream_insufficient_scope_total: counter(
                "tollgate_upstream_insufficient_scope_total",
                "Upstream rejections with RFC 6750 `insufficient_scope`, passed through without renewing the token, by route.",
                &["route"],
            ),
            upstream_challenges_total: counter(
                "tollgate_upstream_challenges_total",
                "Upstream 401/403 answers by route and the RFC 6750 / RFC 9449 `error` of their `WWW-Authenticate` challenge (invalid_token, insufficient_scope, use_dpop_nonce, invalid_dpop_proof, other, none).",
                &["route", "error"],
            ),
            store_errors_total: counter(
                "tollgate_store_errors_total",
                "Token store operations that failed (the token keeps being served from memory), by operation.",
                &["provider", "operation"],
            ),
            fleet_lease_total: counter(
                "tollgate_fleet_lease_total",
                "Attempts to take a provider's fleet-wide refresh lease, by outcome (acquired, busy, lost).",
                &["provider", "outcome"],
            ),
            fleet_fallback_total: counter(
                "tollgate_fleet_fallback_total",
                "Token requests made by this replica alone because the shared store was unreachable.",
                &["provider"],
            ),
            token_source_total: counter(
                "tollgate_token_source_total",
                "Tokens put in use, by where they came from (fetched here, shared by another replica, restored from the store).",
                &["provider", "source"],
            ),
            build_info: igauge("tollgate_build_info", "Build information; always 1.", &["version"]),
            redis_duration: hist(
                "tollgate_redis_duration_seconds",
                "Round trips to the Redis store (fleet mode), by operation, failed ones included.",
                &["operation"],
                vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
            ),
            redis_errors_total: counter(
                "tollgate_redis_errors_total",
                "Redis store operations that failed or timed out, by operation.",
                &["operation"],
            ),
            registry,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Both outcomes exist from start-up, so an alert on `rejected` works before the first reload.
        for outcome in ["success", "rejected", "restart_required"] {
            m.config_reload_total.with_label_values(&[outcome]);
        }
        m
    }

    /// Make every per-provider series exist from the start (a counter that appears only
    /// on the first failure breaks `rate()` and alerts).
    pub fn init_provider(&self, provider: &str) {
        self.token_fetch_total.with_label_values(&[provider, "success"]);
        for class in crate::provider::ErrorClass::ALL {
            self.token_fetch_total.with_label_values(&[provider, class.as_str()]);
        }
        self.token_valid.with_label_values(&[provider]).set(0);
        self.token_fetch_consecutive_failures.with_label_values(&[provider]).set(0);
        self.provider_awaiting_code.with_label_values(&[provider]).set(0);
        self.token_unavailable_total.with_label_values(&[provider]);
        for op in STORE_OPERATIONS {
            self.store_errors_total.with_label_values(&[provider, op]);
        }
        for source in ["fetched", "shared", "restored"] {
            self.token_source_total.with_label_values(&[provider, source]);
        }
    }

    /// Drop every series of a provider that a reload removed, so dashboards and alerts do
    /// not keep seeing its last state (e.g. `tollgate_token_valid 1`) forever.
    pub fn forget_provider(&self, provider: &str) {
        let _ = self.token_fetch_total.remove_label_values(&[provider, "success"]);
        for class in crate::provider::ErrorClass::ALL {
            let _ = self.token_fetch_total.remove_label_values(&[provider, class.as_str()]);
        }
        let _ = self.token_fetch_duration.remove_label_values(&[provider]);
        let _ = self.token_expiry_timestamp.remove_label_values(&[provider]);
        let _ = self.token_valid.remove_label_values(&[provider]);
        let _ = self.token_fetch_consecutive_failures.remove_label_values(&[provider]);
        let _ = self.provider_awaiting_code.remove_label_values(&[provider]);
        let _ = self.token_unavailable_total.remove_label_values(&[provider]);
        for op in STORE_OPERATIONS {
            let _ = self.store_errors_total.remove_label_values(&[provider, op]);
        }
        for source in ["fetched", "shared", "restored"] {
            let _ = self.token_source_total.remove_label_values(&[provider, source]);
        }
        for outcome in ["acquired", "busy", "lost"] {
            let _ = self.fleet_lease_total.remove_label_values(&[provider, outcome]);
        }
        let _ = self.fleet_fallback_total.remove_label_values(&[provider]);
    }

    /// The text exposition.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8 * 1024);
        // Encoding only fails on a writer error, and Vec never errors.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// The `operation` label values of `tollgate_store_errors_total`.
pub const STORE_OPERATIONS: [&str; 3] = ["load", "save", "remove"];

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A route's request metrics, resolved once per config so the request path skips the
/// label hashing and read lock of `with_label_values`: one lock-free `OnceLock` read per
/// status code after its first use.
pub struct RouteMetrics {
    route: String,
    pub duration: prometheus::Histogram,
    by_status: Box<[std::sync::OnceLock<prometheus::IntCounter>]>,
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        RouteMetrics {
            route: route.to_string(),
            duration: get().upstream_duration.with_label_values(&[route]),
            by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// Count one response with `status` (0: none was sent).
    #[inline]
    pub fn count(&self, status: u16) {
        match self.by_status.get(status as usize) {
            Some(cell) => {
                cell.get_or_init(|| get().requests_total.with_label_values(&[&self.route, &status.to_string()])).inc()
            }
            None => get().requests_total.with_label_values(&[&self.route, "other"]).inc(),
        }
    }
}
