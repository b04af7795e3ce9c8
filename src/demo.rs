//! `tollgate demo`: the product working in one command. A token-endpoint double (seed
//! 002's JSON `/oauth/v2/token`, tokens living 20 s) and an echo upstream that accepts
//! only current tokens run on loopback; tollgate runs in front with an embedded config.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config;
use crate::server::{self, RunError};
use crate::testkit::idp::{Idp, IdpConfig};
use crate::testkit::upstream::Upstream;
use crate::testkit::Ledger;

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
client_id = "demo-client"
client_secret = "demo-secret-not-for-production"
encoding = "json"
refresh_before = "5s"

[[routes]]
name = "echo"
path_prefix = "/"
upstream = "{upstream}"
provider = "demo"
"#;

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
    let ledger = Ledger::default();
    let (idp, upstream) = rt
        .block_on(async {
            let idp = Idp::start(
                IdpConfig {
                    client_id: "demo-client".into(),
                    client_secret: "demo-secret-not-for-production".into(),
                    lifetime,
                    token_prefix: "demo".into(),
                    ..IdpConfig::default()
                },
                ledger.clone(),
            )
            .await?;
            let upstream = Upstream::start(Some(ledger.clone())).await?;
            Ok::<_, std::io::Error>((idp, upstream))
        })
        .map_err(DemoError::Double)?;
    let toml = DEMO_CONFIG
        .replace("{listen}", &listen.to_string())
        .replace("{admin}", &admin.to_string())
        .replace("{token_url}", &idp.url())
        .replace("{upstream}", &upstream.url());
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
        up = upstream.url(),
        idp = idp.url(),
        life = lifetime.as_secs(),
    );
    // Keep the doubles' handles alive for the life of the process.
    std::mem::forget((idp, upstream));
    server::run(settings, None, rt)?;
    Ok(())
}
