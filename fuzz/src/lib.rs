//! The bodies of tollgate's fuzz targets. Each `fuzz_targets/<name>.rs` is a one-line
//! `fuzz_target!` wrapper around the function of the same name here, so the same code
//! also runs as an ordinary unit test over the committed seeds (`seeds/<target>/*`, see
//! the tests at the end) on stable Rust, without libFuzzer.
//!
//! Contract of every function: it must not panic for any input. A panic is a bug found
//! in tollgate (or, for the `assert!`s below, a broken invariant of the code under test).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate::provider::steps;
use tollgate::secret::Secret;
use tollgate::template::{Template, Vars};
use tollgate::token::expiry::{self, Lifetime};

/// A target's body: must not panic for any input.
pub type Target = fn(&[u8]);

/// The targets, by name: the names of `fuzz_targets/*.rs` and of `seeds/*/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("token_response", token_response),
    ("jwt_expiry", jwt_expiry),
    ("config", config),
    ("step_extract", step_extract),
    ("template", template),
];

/// A JWT header for wrapping fuzzed claims (`{"alg":"HS256","typ":"JWT"}`).
const JWT_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

const MAX: Duration = Duration::from_secs(24 * 3600);

/// A fixed "now" (2026-01-01T00:00:00Z) so that runs are reproducible.
fn fixed_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600)
}

/// `lifetime` must never hand out more than `max`.
fn check_lifetime(l: &Result<Lifetime, expiry::ExpiryError>, max: Duration) {
    if let Ok(Lifetime::Finite(d)) = l {
        assert!(*d <= max, "lifetime {d:?} exceeds max {max:?}");
    }
}

/// Target `token_response`: a token endpoint's 2xx body, as the OAuth2 source sees it:
/// `parse_token_response`, then the lifetime decision on what it returned.
pub fn token_response(data: &[u8]) {
    let Ok(set) = tollgate::provider::kinds::oauth2::parse_token_response(data) else { return };
    let token = set.access_token.expose();
    assert!(!token.is_empty(), "parse_token_response accepted an empty access_token");
    let l = expiry::lifetime(set.expires_in.as_ref(), token, None, MAX, fixed_now());
    check_lifetime(&l, MAX);
    let later = fixed_now() + Duration::from_secs(10 * 365 * 86_400);
    let l = expiry::lifetime(set.expires_in.as_ref(), token, Some(Duration::from_secs(300)), MAX, later);
    check_lifetime(&l, MAX);
}

/// Target `jwt_expiry`: `jwt_exp` and `lifetime`.
///
/// The input, lossily as UTF-8, is either just a token, or three parts separated by
/// `\n`:
/// 1. up to three numbers: "now" in seconds since the epoch, the configured default
///    lifetime in ms (0 = none), `max_lifetime` in ms (missing or unparsable: defaults);
/// 2. the JSON `expires_in` value (absent when it does not parse);
/// 3. the token.
///
/// The token is tried as given, and its bytes are also tried as the claims of a JWT
/// (base64url-encoded between a fixed header and a signature), so that the fuzzer
/// reaches the claims parser without having to discover base64.
pub fn jwt_expiry(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.splitn(3, '\n').collect();
    let (ctrl, exp, token) = match parts[..] {
        [c, e, t] => (c, e, t),
        _ => ("", "", &text[..]),
    };
    let mut nums = ctrl.split_whitespace().map(|w| w.parse::<u64>().ok());
    let mut num = || nums.next().flatten();
    let now = num().and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s))).unwrap_or_else(fixed_now);
    let default = num().filter(|ms| *ms != 0).map(Duration::from_millis);
    let max = num().map(Duration::from_millis).unwrap_or(MAX);
    let expires_in: Option<serde_json::Value> = serde_json::from_str(exp).ok();

    for t in [token.to_string(), wrap_claims(token.as_bytes())] {
        let _ = expiry::jwt_exp(&t);
        check_lifetime(&expiry::lifetime(expires_in.as_ref(), &t, default, max, now), max);
        check_lifetime(&expiry::lifetime(None, &t, default, max, now), max);
    }
}

fn wrap_claims(claims: &[u8]) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{JWT_HEADER}.{}.c2ln", e.encode(claims))
}

/// Target `config`: `config::load_str` (TOML, figment extraction, validation, secret
/// resolution), and the error's `Display`.
///
/// Inputs naming `/dev`, `/proc` or `/sys` are skipped: a `{ file = "/dev/zero" }` or
/// `"/dev/stdin"` secret would block or exhaust memory, which is the operator's choice
/// and not a parser bug. Environment overrides (`TOLLGATE_PROXY__…` etc.) present in
/// the fuzzing process's environment apply too; run with a clean environment.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if ["/dev", "/proc", "/sys"].iter().any(|p| s.contains(p)) {
        return;
    }
    match tollgate::config::load_str(s, Path::new("fuzz.toml")) {
        Ok(settings) => {
            let _ = format!("{settings:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// `(variable, JSON pointer)` pairs, as `steps::extract` takes them.
type Pointers = Vec<(String, String)>;

/// Target `step_extract`: the step engine's `steps::extract` (JSON-pointer extraction
/// from a step's response body), then the lifetime decision on the extracted
/// `expires_in` and `token`, as the engine does.
///
/// Input: either just a response body, extracted with a fixed set of pointers (`token`,
/// `expires_in`, `refresh_token`, a nested and an array pointer), or `name pointer`
/// lines, a blank line, then the body.
pub fn step_extract(data: &[u8]) {
    const DEFAULT: &[(&str, &str)] = &[
        ("token", "/access_token"),
        ("expires_in", "/expires_in"),
        ("refresh_token", "/refresh_token"),
        ("org_id", "/data/org/id"),
        ("unit_ids", "/units"),
        ("first", "/list/0/a~1b~0c"),
    ];
    let (pointers, body): (Pointers, &[u8]) = match find(data, b"\n\n") {
        Some(i) => {
            let head = String::from_utf8_lossy(&data[..i]);
            let pointers = head
                .lines()
                .map(|l| match l.split_once(' ') {
                    Some((n, p)) => (n.to_string(), p.to_string()),
                    None => (l.to_string(), String::new()),
                })
                .collect();
            (pointers, &data[i + 2..])
        }
        None => (DEFAULT.iter().map(|(n, p)| (n.to_string(), p.to_string())).collect(), data),
    };
    let Ok((vars, expires_in)) = steps::extract(body, "fuzz", &pointers) else { return };
    for (name, _) in pointers.iter().filter(|(n, _)| n != steps::EXPIRES_IN) {
        let v = vars.get(name).unwrap_or_else(|| panic!("extract succeeded without `{name}`"));
        assert!(!v.expose().is_empty(), "extract produced an empty `{name}`");
    }
    let token = vars.get(steps::TOKEN).map(|s| s.expose()).unwrap_or("opaque");
    check_lifetime(&expiry::lifetime(expires_in.as_ref(), token, None, MAX, fixed_now()), MAX);
}

/// Target `template`: `Template::parse` of the input (lossily as UTF-8); when it parses,
/// rendering with a value for every placeholder it names must succeed, and rendering
/// with no values must fail exactly when it names one.
pub fn template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(t) = Template::parse(&text) else { return };
    let names: Vec<String> = t.vars().map(str::to_string).collect();
    let vars: Vars = names.iter().map(|n| (n.clone(), Secret::new(format!("<{n}>")))).collect();
    let out = t.render(&vars).expect("render with every placeholder's value failed");
    for n in &names {
        assert!(out.contains(&format!("<{n}>")), "render dropped `{n}`");
    }
    assert_eq!(t.render(&Vars::new()).is_err(), !names.is_empty(), "render without values");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Replays the committed seed inputs through each target's body, so CI exercises the
/// targets' code without libFuzzer. Crash inputs worth keeping as regressions go into
/// `seeds/<target>/` too. (A unit test, not an integration test: those would make
/// `cargo test` link every fuzz binary.)
#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn seeds_replay_without_panic() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (name, run) in super::TARGETS {
            let dir = root.join(name);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "no seeds in {}", dir.display());
            for f in files {
                eprintln!("{name}: {}", f.display());
                run(&std::fs::read(&f).unwrap());
            }
        }
    }

    #[test]
    fn every_target_has_a_binary() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in super::TARGETS {
            let src = root.join("fuzz_targets").join(format!("{name}.rs"));
            assert!(src.is_file(), "{} missing", src.display());
        }
    }
}
