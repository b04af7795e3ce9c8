//! The command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Settings};
use crate::provider::kinds::oauth2::{Endpoint, OAuth2Spec};
use crate::provider::SourceSpec;
use crate::secret::REDACTED;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "A token sidecar: obtains, refreshes and injects bearer tokens for the APIs your app calls."
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TOLLGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy and the admin listener.
    Run {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config and print the resolved routes and providers (secrets redacted).
    Check {
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: PathBuf,
    },
    /// Complete a human login step (OTP, 2FA code) against a running instance.
    Login(crate::login::LoginArgs),
    /// Run a self-contained demonstration with a local token endpoint and echo upstream.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Lifetime of the demo's tokens.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => match config::load(&config) {
            Ok(s) => {
                print!("{}", describe(&s));
                println!("config OK: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: invalid configuration {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let settings = match config::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: invalid configuration {}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            let result = crate::server::control_runtime().and_then(|rt| crate::server::run(settings, Some(config), rt));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Login(args) => match crate::login::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Demo { listen, admin_listen, token_lifetime } => {
            match crate::demo::run(listen, admin_listen, token_lifetime) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Crates whose verbose logs would carry tokens.
const PINGORA_TARGETS: [&str; 6] =
    ["pingora", "pingora_core", "pingora_proxy", "pingora_http", "pingora_pool", "pingora_error"];

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // pingora's debug and trace logs dump request headers and bodies, the injected token
    // included; they are capped at info whatever the operator asks for.
    for target in PINGORA_TARGETS {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The resolved config for `tollgate check`. Secrets show as `<redacted>`.
pub fn describe(s: &Settings) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "proxy: listen {} threads {} token_wait {:?} shutdown_timeout {:?} allow_from {} fast_path {}",
        s.proxy.listen,
        s.proxy.threads,
        s.proxy.token_wait,
        s.proxy.shutdown_timeout,
        if s.proxy.allow_from.is_empty() {
            "(anyone)".to_string()
        } else {
            format!("[{}]", s.proxy.allow_from.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "))
        },
        if s.proxy.fast_path { "on" } else { "off" },
    );
    let _ = writeln!(
        out,
        "admin: listen {} token {}",
        s.admin.listen,
        if s.admin.token.is_some() { REDACTED } else { "(none)" }
    );
    for p in &s.providers {
        match &p.source {
            SourceSpec::OAuth2(o) => {
                let _ = writeln!(
                    out,
                    "provider {}: oauth2 {} grant {:?} client_id {} client_secret {} client_auth {:?} encoding {:?} username {} password {}{}",
                    p.name,
                    match &o.endpoint {
                        Endpoint::Token(u) => format!("{:?}", u.as_str()),
                        Endpoint::Issuer(u) => format!("issuer {:?} (token endpoint from discovery)", u.as_str()),
                    },
                    o.grant,
                    o.client_id.as_deref().unwrap_or("(none)"),
                    if o.client_secret.is_some() { REDACTED } else { "(none)" },
                    o.client_auth,
                    o.encoding,
                    o.username.as_deref().unwrap_or("(none)"),
                    if o.password.is_some() { REDACTED } else { "(none)" },
                    match &o.otp {
                        Some(otp) => format!(" one-time password from {:?} ({} {})", otp.url.as_str(), otp.field, otp.value),
                        None => String::new(),
                    },
                );
                for line in modern_lines(o) {
                    let _ = writeln!(out, "  {line}");
                }
            }
            SourceSpec::Http(h) => {
                let _ = writeln!(
                    out,
                    "provider {}: {} steps at {:?}, values {} (all redacted)",
                    p.name,
                    p.kind.as_str(),
                    h.base_url.as_str(),
                    h.vars.keys().cloned().collect::<Vec<_>>().join(", ")
                );
                for (flow, steps) in [("acquire", &h.acquire), ("refresh", &h.refresh), ("login", &h.login)] {
                    for st in steps.iter() {
                        let _ = writeln!(
                            out,
                            "  {flow} step {}: {} {} encoding {:?} headers [{}] fields [{}] extract [{}]{}",
                            st.name,
                            st.method,
                            st.path,
                            st.encoding,
                            st.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
                            st.fields.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
                            st.extract.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
                            if st.needs_code() { " (needs the human code)" } else { "" },
                        );
                    }
                }
            }
        }
    }
    for p in &s.providers {
        let egress = match &p.http.proxy {
            crate::provider::spec::EgressProxy::Environment => "proxy from the environment".to_string(),
            crate::provider::spec::EgressProxy::Direct => "no proxy".to_string(),
            crate::provider::spec::EgressProxy::Url(u) => format!("proxy {u}"),
        };
        let _ = writeln!(out, "provider {}: egress {egress}", p.name);
    }
    for p in s.providers.iter().filter(|p| !p.upstream_headers.is_empty()) {
        let hs: Vec<String> = p.upstream_headers.iter().map(|(k, t)| format!("{k}: {t}")).collect();
        let _ = writeln!(out, "provider {}: upstream headers [{}]", p.name, hs.join(", "));
    }
    let _ = match &s.store {
        config::StoreSettings::Memory => writeln!(out, "store: memory"),
        config::StoreSettings::File(p) => writeln!(out, "store: file {}", p.display()),
        // The password and keys are never printed; only that they are set and how many.
        config::StoreSettings::Redis(r) => writeln!(
            out,
            "store: redis {} user {} password {} key_prefix {} encryption_keys {} lease_ttl {} timeout {}{}",
            match &r.sentinel {
                Some(_) => "(via sentinel)".to_string(),
                None => r.url.clone(),
            },
            r.username.as_deref().unwrap_or("(none)"),
            if r.password.is_some() { crate::secret::REDACTED } else { "(none)" },
            r.key_prefix,
            r.encryption_keys.len(),
            humantime::format_duration(r.lease_ttl),
            humantime::format_duration(r.timeout),
            match &r.sentinel {
                Some(sn) => format!(" sentinel master {} nodes [{}]", sn.master_name, sn.nodes.join(", ")),
                None => String::new(),
            },
        ),
    };
    for r in &s.routes {
        let _ = writeln!(
            out,
            "route {}: host {} path_prefix {} -> {} provider {} header {}",
            r.name,
            r.host.as_deref().unwrap_or("*"),
            r.path_prefix,
            r.upstream.url,
            r.provider.as_deref().unwrap_or("(none: pass-through)"),
            r.header_name,
        );
    }
    out
}

/// What `check` says of an OAuth2 provider's keys, certificates, files and DPoP: paths
/// and public facts (algorithm, kid, key thumbprint), never key material.
fn modern_lines(o: &OAuth2Spec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(k) = &o.signing_key {
        out.push(format!(
            "client assertion key {:?} ({}{})",
            k.file.path.display().to_string(),
            k.alg.map(|a| a.as_str()).unwrap_or("alg from the key"),
            k.kid.as_ref().map(|k| format!(", kid {k}")).unwrap_or_default()
        ));
    }
    if let Some(f) = &o.client_assertion_file {
        out.push(format!("client assertion read from {:?} before every token request", f.display().to_string()));
    }
    if let Some(c) = &o.client_cert {
        out.push(format!(
            "client certificate {:?} key {:?}{}",
            c.cert.path.display().to_string(),
            c.key.path.display().to_string(),
            if c.upstream { " (also presented to the upstream)" } else { "" }
        ));
    }
    if let Some(f) = &o.assertion_file {
        out.push(format!("assertion read from {:?} before every token request", f.display().to_string()));
    }
    if let Some(x) = &o.exchange {
        out.push(format!(
            "token exchange: subject token {:?} ({}){}{}",
            x.subject_token_file.display().to_string(),
            x.subject_token_type,
            x.actor_token_file
                .as_ref()
                .map(|a| format!(", actor token {:?}", a.display().to_string()))
                .unwrap_or_default(),
            x.requested_token_type.as_ref().map(|r| format!(", requesting {r}")).unwrap_or_default(),
        ));
    }
    if !o.resource.is_empty() {
        out.push(format!("resource {}", o.resource.join(" ")));
    }
    if let Some(d) = &o.dpop {
        out.push(format!(
            "dpop: key thumbprint {} ({})",
            d.key.thumbprint(),
            match &d.key_file {
                Some(f) => format!("from {:?}", f.display().to_string()),
                None => "generated at start; set dpop_key_file to keep it across restarts and share it across replicas"
                    .into(),
            }
        ));
    }
    out
}
