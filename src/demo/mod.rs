//! `tollgate demo`: the product working in one command. A token-endpoint double (seed
//! 002's JSON `/oauth/v2/token`, tokens living 20 s) and an echo upstream that accepts
//! only current tokens run on loopback ([`doubles`]); tollgate runs in front with an
//! embedded config.

pub mod doubles;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config;
use crate::server::{self, RunError};

/// The embedded config; `{…}` placeholders are filled with the doubles' ports.
pub const DEMO_CONFIG: &str = r#"
[proxy]
listen = "{listen}"
access_log = true

[admin]
listen = "{admin}"

[providers.demo]
kind = "oauth2"
token_url = "{token_url}"
grant = "client_credentials"
client_id = "{client_id}"
client_secret = "{client_secret}"
encoding = "json"
refresh_before = "5s"

[[routes]]
name = "echo"
path_prefix = "/"
upstream = "{upstream}"
provider = "demo"
"#;

/// The demo client's credentials, known to both the embedded config and the double.
const DEMO_CLIENT_ID: &str = "demo-client";
const DEMO_CLIENT_SECRET: &str = "demo-secret-not-for-production";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot start a demo double: {0}")]
    Double(std::io::Error),
    #[error("embedded demo config is invalid: {0}")]
    Config(#[from] config::ConfigError),
}

pub fn run(listen: SocketAddr, admin: SocketAddr, lifetime: Duration) -> Result<(), DemoError> {
    let rt = server::control_runtime()?;
    // The doubles' tasks run on the control runtime, which lives as long as the process.
    let doubles =
        rt.block_on(doubles::start(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, lifetime)).map_err(DemoError::Double)?;
    let toml = DEMO_CONFIG
        .replace("{listen}", &listen.to_string())
        .replace("{admin}", &admin.to_string())
        .replace("{client_id}", DEMO_CLIENT_ID)
        .replace("{client_secret}", DEMO_CLIENT_SECRET)
        .replace("{token_url}", &doubles.token_url)
        .replace("{upstream}", &doubles.upstream_url);
    let settings = config::load_str(&toml, Path::new("<embedded demo config>"))?;
    println!(
        r#"tollgate demo
  proxy           http://{listen}  ->  echo upstream {up} (accepts only current tokens)
  admin           http://{admin}
  token endpoint  {idp}  (client_credentials, JSON body, tokens live {life} s)

Try, in another terminal:
  curl -s http://{listen}/hello?x=1                # the upstream echoes the Authorization header tollgate added
  curl -s -X POST -d 'a=1' http://{listen}/orders  # bodies pass through untouched
  curl -s http://{admin}/admin/providers           # token state: generation, expiry (never the token)
  curl -s http://{admin}/metrics | grep '^tollgate_token'
  curl -s -X POST http://{admin}/admin/providers/demo/refresh
  for i in $(seq 6); do curl -s http://{listen}/ | grep -o 'Bearer demo-[0-9]*'; sleep 5; done   # a new token before each expiry
Stop with Ctrl-C.
"#,
        up = doubles.upstream_url,
        idp = doubles.token_url,
        life = lifetime.as_secs(),
    );
    server::run(settings, None, rt)?;
    Ok(())
}
