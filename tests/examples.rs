//! Every shipped example in `config/` is a valid config: `tollgate check` (the real
//! binary) accepts it, prints no secret, and names each provider's kind. The directory
//! is globbed at test time, so a new example is covered without touching this file.
//!
//! Secrets the examples reference are supplied with dummy values: `{ env = "VAR" }` by
//! setting `VAR`, `{ file = "/run/secrets/…" }` (and any `ca_file`) by rewriting the path
//! in a temporary copy to a file the test creates.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no config/*.toml examples found");
    files
}

/// The quoted strings that follow `<key> = ` anywhere in `text`, e.g. every VAR in
/// `{ env = "VAR" }`. `key` must start a word (`file` does not match `ca_file`).
fn quoted_after(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        let before = rest[..i].chars().last();
        let after = &rest[i + key.len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let Some(after) = after.trim_start().strip_prefix('=') else { continue };
        let Some(after) = after.trim_start().strip_prefix('"') else { continue };
        if let Some(end) = after.find('"') {
            out.push(after[..end].to_string());
        }
    }
    out
}

struct Prepared {
    _dir: tempfile::TempDir,
    path: PathBuf,
    env: Vec<(String, String)>,
    /// Every dummy secret value handed to tollgate; none may appear in its output.
    dummies: Vec<String>,
}

/// A temporary copy of `example` whose secret files exist, plus the env it needs.
fn prepare(example: &Path) -> Prepared {
    let mut text = std::fs::read_to_string(example).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env = Vec::new();
    let mut dummies = Vec::new();
    let stem = example.file_stem().unwrap().to_string_lossy().to_string();

    for (n, var) in quoted_after(&text, "env").into_iter().enumerate() {
        if env.iter().any(|(k, _)| *k == var) {
            continue;
        }
        let value = format!("dummy-env-secret-{stem}-{n}-Zq7xW");
        dummies.push(value.clone());
        env.push((var, value));
    }
    // `{ file = … }` secrets and CA files: rewritten to files in the temp dir.
    let mut files = quoted_after(&text, "file");
    files.extend(quoted_after(&text, "ca_file"));
    for (n, original) in files.into_iter().enumerate() {
        let copy = dir.path().join(format!("file-{n}"));
        let value = format!("dummy-file-secret-{stem}-{n}-Kp3vR");
        std::fs::write(&copy, format!("{value}\n")).unwrap();
        dummies.push(value);
        text = text.replace(&format!("\"{original}\""), &format!("\"{}\"", copy.display()));
    }
    // Keys and certificates: a real P-256 key and a certificate for it (the check parses
    // them); tokens read per request: dummy text. None of it may be printed.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["tollgate.test".into()]).unwrap().self_signed(&key).unwrap();
    let key_pem = key.serialize_pem();
    dummies.extend(key_pem.lines().filter(|l| !l.starts_with("-----")).map(str::to_string));
    for (n, (k, content)) in [
        ("private_key_file", key_pem.clone()),
        ("dpop_key_file", key_pem.clone()),
        ("client_key_file", key_pem.clone()),
        ("client_cert_file", cert.pem()),
        ("assertion_file", format!("dummy-assertion-{stem}-Hd8sQ")),
        ("client_assertion_file", format!("dummy-client-assertion-{stem}-Hd8sQ")),
        ("subject_token_file", format!("dummy-subject-{stem}-Hd8sQ")),
        ("actor_token_file", format!("dummy-actor-{stem}-Hd8sQ")),
    ]
    .into_iter()
    .enumerate()
    {
        for original in quoted_after(&text, k) {
            let copy = dir.path().join(format!("{k}-{n}"));
            std::fs::write(&copy, &content).unwrap();
            if !content.starts_with("-----") {
                dummies.push(content.clone());
            }
            text = text.replace(&format!("\"{original}\""), &format!("\"{}\"", copy.display()));
        }
    }
    let path = dir.path().join(example.file_name().unwrap());
    std::fs::write(&path, text).unwrap();
    Prepared { _dir: dir, path, env, dummies }
}

struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
    dummies: Vec<String>,
}

fn check(example: &Path) -> Checked {
    let p = prepare(example);
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(&p.path).env("NO_COLOR", "1");
    // The caller's own TOLLGATE_* overrides must not change what is being checked.
    for (k, _) in std::env::vars() {
        if k.starts_with("TOLLGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in &p.env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Checked {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        dummies: p.dummies,
    }
}

/// (provider name, kind) for every `[providers.*]` table, read as tollgate reads the file.
fn provider_kinds(example: &Path) -> Vec<(String, String)> {
    use figment::providers::{Format, Toml};
    let v: serde_json::Value = figment::Figment::from(Toml::file_exact(example))
        .extract()
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    v.get("providers")
        .and_then(|p| p.as_object())
        .map(|m| m.iter().map(|(name, p)| (name.clone(), p["kind"].as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

#[test]
fn every_example_passes_check_without_printing_a_secret() {
    let mut failures = Vec::new();
    for example in examples() {
        let c = check(&example);
        let name = example.display();
        if c.code != 0 {
            failures.push(format!("{name}: exit {}\nstdout:\n{}\nstderr:\n{}", c.code, c.stdout, c.stderr));
            continue;
        }
        if !c.stdout.contains("config OK") {
            failures.push(format!("{name}: no `config OK` line:\n{}", c.stdout));
        }
        for d in &c.dummies {
            if c.stdout.contains(d.as_str()) || c.stderr.contains(d.as_str()) {
                failures.push(format!("{name}: a secret value was printed:\n{}{}", c.stdout, c.stderr));
            }
        }
        if provider_kinds(&example).is_empty() {
            failures.push(format!("{name}: defines no provider"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_output_names_each_providers_kind() {
    let mut failures = Vec::new();
    for example in examples() {
        let c = check(&example);
        for (provider, kind) in provider_kinds(&example) {
            // The provider's line must carry the kind as a word of its own (so `http`
            // is not found inside a `https://` URL).
            let prefix = format!("provider {provider}:");
            let line = c.stdout.lines().find(|l| l.starts_with(&prefix));
            // After the prefix, so that a provider named like its kind does not count.
            let named = line.is_some_and(|l| {
                l[prefix.len()..]
                    .split_whitespace()
                    .map(|w| w.trim_matches(|ch: char| matches!(ch, '"' | ',' | '(' | ')' | ':' | '=')))
                    .any(|w| w == kind)
            });
            if !named {
                failures.push(format!(
                    "{}: `tollgate check` does not name kind `{kind}` for provider `{provider}`: {}",
                    example.display(),
                    line.unwrap_or("(no `provider` line)")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn secret_references_are_found_in_example_text() {
    let text = r#"
password = { env = "PW" }
secrets = { a = { env="A_KEY" }, b = { file = "/run/secrets/b" } }
ca_file = "/etc/ca.pem"
admin_token_file = "/not/a/secret/ref"
[store]
kind = "file"
"#;
    assert_eq!(quoted_after(text, "env"), ["PW", "A_KEY"]);
    assert_eq!(quoted_after(text, "file"), ["/run/secrets/b"]);
    assert_eq!(quoted_after(text, "ca_file"), ["/etc/ca.pem"]);
}

/// `config/tollgate.example.toml` is the reference: every field of the file schema
/// (`src/schema.rs`) appears in it, set or commented out.
#[test]
fn reference_example_mentions_every_config_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = std::fs::read_to_string(root.join("src/schema.rs")).unwrap();
    let example = std::fs::read_to_string(root.join("config/tollgate.example.toml")).unwrap();
    let keys: Vec<&str> = model
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter(|l| !l.starts_with("fn ") && !l.starts_with("struct ") && !l.starts_with("enum "))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim()))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(keys.len() > 40, "the model's fields were not found: {keys:?}");
    // `key =` as a whole word (`timeout =` must not be satisfied by `connect_timeout =`),
    // or the key as a table name.
    let assigned = |k: &str| {
        let pat = format!("{k} =");
        example
            .match_indices(&pat)
            .any(|(i, _)| example[..i].chars().last().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')))
    };
    let missing: Vec<&&str> = keys
        .iter()
        .filter(|k| {
            !assigned(k)
                && ![format!(".{k}]"), format!("[{k}]"), format!("[{k}."), format!("[[{k}]]")]
                    .iter()
                    .any(|p| example.contains(p.as_str()))
        })
        .collect();
    assert!(missing.is_empty(), "config/tollgate.example.toml does not document: {missing:?}");
}
