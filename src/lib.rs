//! tollgate: a token sidecar. It sits between an app and the APIs it calls, obtains
//! bearer tokens from identity providers, keeps them fresh, and adds them to every
//! proxied request.
//!
//! Data flow: [`config`] → [`provider`] (token sources) → [`token`] cells, filled by
//! provider drivers → read lock-free by the [`proxy`] on every request. The [`admin`] listener
//! exposes health, readiness, metrics and provider state; [`gateway`] holds the running
//! configuration and swaps it on reload.
//!
//! Dependency direction: [`config`] validates the common settings and calls into
//! [`provider`] for each provider kind; [`provider`] never imports [`config`]. Both use
//! the leaf modules [`schema`] (the file as written), [`secret`], [`template`] and
//! [`checks`], which import neither.

pub mod admin;
pub mod checks;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fastpath;
pub mod gateway;
pub mod jose;
pub mod login;
pub mod metrics;
pub mod provider;
pub mod proxy;
pub mod reload;
pub mod schema;
pub mod secret;
pub mod server;
pub mod store;
pub mod template;
pub mod token;
