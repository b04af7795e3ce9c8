//! What one DPoP proof costs on its own: `DpopKey::proof` as the proxy calls it for every
//! request of a DPoP provider (method, URL, the token's `ath`, no nonce), timed in a tight
//! loop on one thread. `bench/dpop.sh` runs it next to the whole-proxy measurement, so the
//! report can say how much of the per-request difference is the signature itself.
//!
//! Usage: `cargo run --release --example dpop_cost [proofs per batch] [batches]`
//! (defaults 2000 and 9). Prints one JSON object: the median, minimum and maximum over the
//! batches of the wall-clock µs per proof. One thread that never blocks, so wall clock is
//! its CPU time as long as nothing else shares the core (`bench/dpop.sh` pins it).

use std::hint::black_box;
use std::time::Instant;

use tollgate::jose::dpop::{ath, DpopKey};

fn stats(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000).max(1);
    let batches: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(9).max(1);

    let key = DpopKey::generate();
    // The bench's token length (807 bytes, bench/harness.py make_token) and its upstream URL.
    let token = "A".repeat(807);
    let ath = ath(&token);
    let htu = "http://127.0.0.1:18001/";

    for _ in 0..n.min(500) {
        black_box(key.proof("GET", htu, Some(&ath), None));
    }
    let mut wall = Vec::with_capacity(batches);
    let mut len = 0;
    for _ in 0..batches {
        let t0 = Instant::now();
        for _ in 0..n {
            let v = black_box(key.proof(black_box("GET"), black_box(htu), Some(black_box(&ath)), None));
            len = v.len();
        }
        let dt = t0.elapsed().as_secs_f64();
        wall.push(dt * 1e6 / n as f64);
    }
    let (wm, wlo, whi) = stats(wall);
    println!(
        "{{\"proofs_per_batch\":{n},\"batches\":{batches},\"proof_bytes\":{len},\
         \"wall_us_per_proof\":{{\"median\":{wm:.2},\"min\":{wlo:.2},\"max\":{whi:.2}}}}}"
    );
}
