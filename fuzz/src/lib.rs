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
    ("fastpath_diff", fastpath_diff),
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

/// Target `fastpath_diff`: the fast path's request classifier against pingora's own
/// HTTP/1 request parser plus tollgate's hygiene check (issue 13, design §6 item 3), and
/// the fast path's chunked-body framing against pingora's client-side body reader.
///
/// Input: bytes as a client sends them. Invariants:
/// - whenever `fastpath::parse` says `Plain`, pingora reads the head without error,
///   `proxy::hygiene::check` passes, and both saw the same method, target, version, raw
///   head, fields (every name with its values in order) and, when the body is all there,
///   the same body bytes;
/// - the same bytes taken as a chunked response body: when `framing::Chunked` finds its
///   end, pingora de-chunks it without error to the same payload, and `Chunked` finds
///   the same end whatever the split of the bytes into two reads.
pub fn fastpath_diff(data: &[u8]) {
    fastpath_diff_compared(data);
}

/// [`fastpath_diff`], saying which comparisons ran: (a plain head was compared with
/// pingora's reading, a chunked body was compared with pingora's de-chunking).
pub fn fastpath_diff_compared(data: &[u8]) -> (bool, bool) {
    RUNTIME.with(|rt| (rt.block_on(request_head(data)), rt.block_on(chunked_body(data))))
}

thread_local! {
    /// pingora's parsers are async; a `Cursor` never waits, so one current-thread
    /// runtime per fuzzing thread drives them.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
}

async fn request_head(data: &[u8]) -> bool {
    use tollgate::fastpath::parse::{parse, Parsed};
    let Parsed::Plain(head) = parse(data) else { return false };
    let shown = String::from_utf8_lossy(&data[..head.len]);
    let mut session = pingora::proxy::Session::new_h1(Box::new(std::io::Cursor::new(data.to_vec())));
    match session.read_request().await {
        Ok(true) => {}
        Ok(false) => panic!("plain, but pingora read no request: {shown:?}"),
        Err(e) => panic!("plain, but pingora refuses it ({e}): {shown:?}"),
    }
    if let Err(r) = tollgate::proxy::hygiene::check(&mut session) {
        panic!("plain, but hygiene refuses it ({} {}): {shown:?}", r.status, r.message);
    }
    let raw = session.as_http1().map(|h1| h1.get_headers_raw_bytes());
    assert_eq!(raw.as_deref(), Some(&data[..head.len]), "raw head: {shown:?}");
    let req = session.req_header();
    assert_eq!(req.method.as_str().as_bytes(), head.method(data), "method: {shown:?}");
    assert_eq!(req.raw_path(), head.target(data), "target: {shown:?}");
    let version = if head.minor == 1 { http::Version::HTTP_11 } else { http::Version::HTTP_10 };
    assert_eq!(req.version, version, "version: {shown:?}");
    // Every field, with its values in order (pingora's map groups them by name).
    assert_eq!(req.headers.len(), head.fields.len(), "field count: {shown:?}");
    for (n, _) in &head.fields {
        let name = String::from_utf8_lossy(&data[n.clone()]).to_ascii_lowercase();
        let ours: Vec<&[u8]> = head
            .fields
            .iter()
            .filter(|(m, _)| data[m.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &data[v.clone()])
            .collect();
        let theirs: Vec<&[u8]> = req.headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
        assert_eq!(ours, theirs, "values of `{name}`: {shown:?}");
    }
    assert_eq!(req.headers.get("host").map(|v| v.as_bytes()), Some(head.host(data)), "host: {shown:?}");
    // The body, when all of it is there (a Cursor's end is the client closing).
    let length = head.content_length.unwrap_or(0);
    let Some(end) = usize::try_from(length).ok().and_then(|l| head.len.checked_add(l)) else { return true };
    if end > data.len() {
        return true;
    }
    let mut body = Vec::new();
    // Bounded: every round returns at least one byte or ends.
    for _ in 0..=data.len() {
        match session.read_request_body().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => break,
            Err(e) => panic!("plain, but pingora fails on its body ({e}): {shown:?}"),
        }
    }
    assert_eq!(body, &data[head.len..end], "body: {shown:?}");
    true
}

async fn chunked_body(data: &[u8]) -> bool {
    use tollgate::fastpath::framing::{Chunked, Feed};
    let end = match Chunked::default().feed(data) {
        Feed::Done(n) => Some(n),
        Feed::More | Feed::Invalid => None,
    };
    // The same end whatever the split (the fast path sees the body in reads).
    if let Some(&first) = data.first() {
        let split = usize::from(first) % (data.len() + 1);
        let mut c = Chunked::default();
        let split_end = match c.feed(&data[..split]) {
            Feed::Done(n) => Some(n),
            Feed::Invalid => None,
            Feed::More => match c.feed(&data[split..]) {
                Feed::Done(n) => Some(split + n),
                Feed::More | Feed::Invalid => None,
            },
        };
        assert_eq!(end, split_end, "split at {split}: {:?}", String::from_utf8_lossy(data));
    }
    let Some(end) = end else { return false };
    let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    wire.extend_from_slice(&data[..end]);
    let mut up = pingora::protocols::http::v1::client::HttpSession::new(Box::new(std::io::Cursor::new(wire)));
    if let Err(e) = up.read_response().await {
        panic!("pingora refuses a plain chunked answer head: {e}");
    }
    let mut body = Vec::new();
    for _ in 0..=data.len() + 1 {
        match up.read_body_bytes().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => break,
            Err(e) => {
                panic!("framing accepts a chunked body pingora refuses ({e}): {:?}", String::from_utf8_lossy(data))
            }
        }
    }
    assert!(up.is_body_done(), "pingora did not see the end: {:?}", String::from_utf8_lossy(data));
    assert_eq!(body, dechunk(&data[..end]), "payload: {:?}", String::from_utf8_lossy(data));
    true
}

/// The payload of a chunked body `Chunked` accepted (trailers left out).
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(e) = raw.get(i..).and_then(|rest| find(rest, b"\r\n")) {
        let line = &raw[i..i + e];
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let size = std::str::from_utf8(&line[..digits]).ok().and_then(|d| usize::from_str_radix(d, 16).ok());
        let Some(size) = size.filter(|s| *s > 0) else { break };
        i += e + 2;
        out.extend_from_slice(raw.get(i..(i + size).min(raw.len())).unwrap_or_default());
        i += size + 2;
    }
    out
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

    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    }

    /// The fastpath_diff seeds reach both comparisons (so the replay above is not vacuous).
    #[test]
    fn fastpath_diff_seeds_reach_both_comparisons() {
        let ran: Vec<(bool, bool)> = seeds("fastpath_diff").iter().map(|s| super::fastpath_diff_compared(s)).collect();
        assert!(ran.iter().filter(|r| r.0).count() >= 5, "plain heads compared: {ran:?}");
        assert!(ran.iter().filter(|r| r.1).count() >= 2, "chunked bodies compared: {ran:?}");
    }

    /// A bounded, seeded mutation run of fastpath_diff on stable Rust (no libFuzzer):
    /// byte flips, insertions of HTTP tokens, deletions and duplications of ranges of
    /// the seeds. Deterministic; about a second in a debug build.
    #[test]
    fn fastpath_diff_survives_seeded_mutations() {
        #[rustfmt::skip]
        const TOKENS: &[&[u8]] = &[
            b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b";", b",", b"0", b"5", b"f", b"F", b"\r\n\r\n",
            b"Content-Length: ", b"Host: ", b"Transfer-Encoding: chunked", b"Connection: ", b"HTTP/1.0",
            b"0\r\n\r\n", b"%", b"?", b"\x00", b"\x7f", b"\xff", b"keep-alive", b"close", b"@", b"#",
            b"[::1]", b"\x80", b"GET", b"HEAD", b"Content-Length: 0\r\n", b"Host: y\r\n",
        ];
        let seeds = seeds("fastpath_diff");
        // Another seed explores further: FASTPATH_DIFF_SEED=<u64> cargo test --lib.
        let mut x: u64 =
            std::env::var("FASTPATH_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x13_fa57_9a7e);
        x |= 1;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let (mut heads, mut bodies) = (0, 0);
        for _ in 0..100_000 {
            let mut d = seeds[next(seeds.len())].clone();
            for _ in 0..1 + next(4) {
                let at = next(d.len() + 1);
                match next(4) {
                    0 if at < d.len() => d[at] ^= 1 << next(8),
                    1 => {
                        let t = TOKENS[next(TOKENS.len())];
                        d.splice(at..at, t.iter().copied());
                    }
                    2 if at < d.len() => {
                        let end = (at + 1 + next(8)).min(d.len());
                        d.drain(at..end);
                    }
                    _ if at < d.len() => {
                        let end = (at + 1 + next(16)).min(d.len());
                        let part = d[at..end].to_vec();
                        d.splice(at..at, part);
                    }
                    _ => {}
                }
            }
            let (h, b) = super::fastpath_diff_compared(&d);
            heads += usize::from(h);
            bodies += usize::from(b);
        }
        eprintln!("fastpath_diff mutations: {heads} plain heads and {bodies} chunked bodies compared");
        assert!(heads > 1000 && bodies > 100, "{heads} {bodies}");
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
