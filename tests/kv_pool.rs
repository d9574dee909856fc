//! The resident K/V pool (src/kv_pool.rs) against the plain path, through the real ONNX
//! Runtime on the parity bundle (its denoiser takes `kv_index`): many images over many
//! calls, so that the pool grows, reuses slots and lets idle images go, must give the
//! same x0 as sending each call's K/V with the call.

use std::path::PathBuf;
use std::sync::Arc;

use ladic_serve::bundle::Bundle;
use ladic_serve::kv_pool::IDLE_CALLS;
use ladic_serve::runtime::{self, DeviceChoice, Models, SessionOptions};
use ladic_serve::sampler::{Denoiser, KvRef};
use ndarray::{Array3, Axis};

fn load(bundle: &Bundle, kv_pool: bool, row_parallelism: usize) -> Models {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let opts = SessionOptions {
        device: DeviceChoice::Cpu,
        intra_op_threads: 1,
        row_parallelism,
        kv_pool,
    };
    Models::load(&rt, bundle, &opts).expect("sessions load")
}

#[test]
fn resident_pool_matches_sending_the_kv_with_every_call() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle");
    let bundle = Bundle::load(&dir).expect("parity bundle loads");
    assert!(bundle.manifest.denoiser_gathers_kv());
    let m = &bundle.manifest;
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let size = m.image.size as usize;

    let mut pooled = load(&bundle, true, 2);
    let mut plain = load(&bundle, false, 1);
    assert_eq!(
        pooled.kv_pool_stats().map(|s| s.uploads),
        Some(1),
        "the null K/V"
    );
    assert_eq!(plain.kv_pool_stats(), None);

    // 150 distinct images: more than the pool's first 64 slots.
    let images: Vec<Arc<Array3<f32>>> = (0..150)
        .map(|i| {
            let pixels = ndarray::Array4::from_shape_fn((1, 3, size, size), |(_, c, y, x)| {
                (((i * 7 + c * 13 + y * 3 + x) % 23) as f32) / 11.0 - 1.0
            });
            let kv = pooled.encode(pixels.view()).expect("encoder runs");
            Arc::new(kv.index_axis_move(Axis(0), 0))
        })
        .collect();

    // Calls: a wide one (grows the pool), then overlapping windows that come back to
    // old images after they have gone idle, with guided (null) rows mixed in.
    let mut calls: Vec<Vec<Option<usize>>> = vec![(0..100).map(Some).collect()];
    for start in [90usize, 95, 120, 0, 0, 0, 0, 0, 140, 5] {
        let mut rows: Vec<Option<usize>> = (start..(start + 12).min(150)).map(Some).collect();
        rows.push(None);
        rows.insert(3, Some(start)); // the same image twice in one call
        calls.push(rows);
    }
    for (n, rows) in calls.iter().enumerate() {
        let b = rows.len();
        let x = Array3::from_shape_fn((b, l, d), |(r, i, j)| {
            (((n * 5 + r * 3 + i * 2 + j) % 17) as f32) / 8.0 - 1.0
        });
        let sc = Array3::from_shape_fn((b, l, d), |(r, i, j)| ((r + i + j) % 5) as f32 / 10.0);
        let t: Vec<i64> = (0..b).map(|r| ((n * 97 + r * 31) % 1000) as i64).collect();
        let kv: Vec<KvRef<'_>> = rows
            .iter()
            .map(|r| r.map_or(KvRef::Null, |i| KvRef::Image(&images[i])))
            .collect();
        let got = Denoiser::denoise(&mut pooled, x.view(), sc.view(), &t, &kv).expect("pooled");
        let want = Denoiser::denoise(&mut plain, x.view(), sc.view(), &t, &kv).expect("plain");
        let diff = (&got - &want).mapv(f32::abs).fold(0.0f32, |a, &v| a.max(v));
        assert!(diff <= 1e-5, "call {n}: x0 differs by {diff}");
    }

    let stats = pooled.kv_pool_stats().expect("a pool");
    assert!(stats.grows >= 1, "100 images outgrow 64 slots: {stats:?}");
    let distinct_in = |rows: &[Option<usize>]| {
        let mut ids: Vec<usize> = rows.iter().flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    // What sending the K/V with every call copies: each call's distinct images.
    let per_call: u64 = calls.iter().map(|r| distinct_in(r).len() as u64).sum();
    let distinct = distinct_in(&calls.concat());
    // Images 12.. left the calls for more than IDLE_CALLS calls and came back in the
    // last one: copied in again. Everything else was copied once, not once per call.
    const { assert!(IDLE_CALLS < 9, "the last call must find images 12-16 gone") };
    assert!(stats.uploads > 1 + distinct.len() as u64, "{stats:?}");
    assert!(
        stats.uploads < 1 + per_call,
        "{stats:?}, per call {per_call}"
    );
}
