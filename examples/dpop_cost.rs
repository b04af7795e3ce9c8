//! Cost of one DPoP proof on the request path (bench/ figures for issue 12): µs per
//! `DpopKey::proof()` with `ath` and a nonce, on one thread, over a bounded loop.
//!
//! Usage: `cargo run --release --example dpop_cost [-- PROOFS]` (default 20 000, at most
//! 1 000 000). Prints one human line and one JSON line for the proof, then, for the same
//! number of signatures over a message of a proof's length, what the ECDSA P-256
//! signature alone costs with ring (what `proof()` uses) and with the p256 crate (its
//! fallback), so that the share of the signature is visible.

use std::hint::black_box;
use std::time::Instant;

use tollgate::jose::{ath, DpopKey};

fn main() {
    let proofs: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20_000).clamp(1, 1_000_000);
    let key = DpopKey::generate();
    let token_ath = ath("an-access-token-of-typical-length-0123456789abcdefghijklmnopqrstuvwxyz");
    let htu = "https://api.example.com/v1/orders";
    let nonce = "eyJ7S_zG.eyJH0-Z.HX4w-7v";

    // Warm-up: thread-local RNG, caches, allocator.
    for _ in 0..proofs.min(1_000) {
        black_box(key.proof("GET", htu, Some(&token_ath), Some(nonce)));
    }
    let start = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..proofs {
        bytes += black_box(key.proof(black_box("GET"), black_box(htu), Some(&token_ath), Some(nonce))).len();
    }
    let elapsed = start.elapsed();
    let per_proof_us = elapsed.as_secs_f64() * 1e6 / f64::from(proofs);
    let avg_len = bytes / proofs as usize;
    println!(
        "{per_proof_us:.1} µs per DPoP proof ({proofs} proofs in {elapsed:.2?}, one thread, {avg_len} bytes each)"
    );
    println!(r#"{{"proofs":{proofs},"us_per_proof":{per_proof_us:.2},"proof_bytes":{avg_len}}}"#);

    let message = vec![b'a'; avg_len.saturating_sub(87)];
    let p256_key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let p256_us = per_call_us(proofs, || {
        let signature: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(&p256_key, black_box(&message));
        black_box(signature);
    });
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let ring_key = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
        .and_then(|pkcs8| {
            ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| ring::error::Unspecified)
        })
        .expect("ring P-256 key");
    let ring_us = per_call_us(proofs, || {
        black_box(ring_key.sign(&rng, black_box(&message)).expect("ring signature"));
    });
    println!("ECDSA P-256 signature alone: {p256_us:.1} µs with p256, {ring_us:.1} µs with ring");
    println!(r#"{{"sign_only_us":{{"p256":{p256_us:.2},"ring":{ring_us:.2}}}}}"#);
}

fn per_call_us(calls: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..calls.min(1_000) {
        f();
    }
    let start = Instant::now();
    for _ in 0..calls {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(calls)
}
