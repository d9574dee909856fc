//! The resident K/V pool (src/kv_pool.rs) against the plain path, through the real ONNX
//! Runtime on the parity bundle (its denoiser takes `kv_index`): many images over many
//! calls, so that the pool grows, reuses slots and lets idle images go, must give the
//! same x0 as sending each call's K/V with the call.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use ladic_serve::bundle::Bundle;
use ladic_serve::kv_pool::{IDLE_CALLS, KvElement, KvPool, ResidentKv};
use ladic_serve::runtime::{self, DeviceChoice, Models, SessionOptions};
use ladic_serve::sampler::{Denoiser, ImageKv, KvRef};
use ndarray::{Array3, Axis};

fn load(bundle: &Bundle, kv_pool: bool, row_parallelism: usize) -> Models {
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let opts = SessionOptions {
        device: DeviceChoice::Cpu,
        intra_op_threads: 1,
        row_parallelism,
        kv_pool,
        cuda_graph: false,
        device_loop: false,
        max_batch_rows: 64,
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
    let images = common::encoded_images(&mut pooled, 150, size);

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
        let diff = common::x0_difference(&mut pooled, &mut plain, &images, rows, n, (l, d));
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

/// Pixels of test image `i` (distinct per `i`).
fn pixels(first: usize, count: usize, size: usize) -> ndarray::Array4<f32> {
    ndarray::Array4::from_shape_fn((count, 3, size, size), |(b, c, y, x)| {
        ((((first + b) * 7 + c * 13 + y * 3 + x) % 23) as f32) / 11.0 - 1.0
    })
}

fn slot_of(kv: &ImageKv) -> usize {
    match kv {
        ImageKv::Resident(r) => r.slot(),
        ImageKv::Host(_) => panic!("expected K/V resident in the pool"),
    }
}

#[test]
fn encoder_writes_straight_into_the_pool_and_slots_come_back_when_released() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle");
    let bundle = Bundle::load(&dir).expect("parity bundle loads");
    let m = &bundle.manifest;
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let size = m.image.size as usize;

    let mut pooled = load(&bundle, true, 2);
    let mut plain = load(&bundle, false, 1);
    let host = |plain: &mut Models, first: usize, count: usize| -> Vec<Arc<Array3<f32>>> {
        let kv = plain
            .encode(pixels(first, count, size).view())
            .expect("encoder runs");
        kv.outer_iter().map(|k| Arc::new(k.to_owned())).collect()
    };
    // Denoises one row per image (plus a null row) with the resident K/V and with the
    // host K/V of the same images; the two must agree.
    let check = |pooled: &mut Models,
                 plain: &mut Models,
                 resident: &[&ImageKv],
                 host: &[&Arc<Array3<f32>>],
                 what: &str| {
        let b = resident.len() + 1;
        let x = Array3::from_shape_fn((b, l, d), |(r, i, j)| {
            (((r * 3 + i * 2 + j) % 17) as f32) / 8.0 - 1.0
        });
        let sc = Array3::from_shape_fn((b, l, d), |(r, i, j)| ((r + i + j) % 5) as f32 / 10.0);
        let t: Vec<i64> = (0..b).map(|r| (r * 131 % 1000) as i64).collect();
        let mut with_pool: Vec<KvRef<'_>> = resident.iter().map(|k| k.as_kv_ref()).collect();
        let mut with_host: Vec<KvRef<'_>> = host.iter().map(|a| KvRef::Image(a)).collect();
        with_pool.push(KvRef::Null);
        with_host.push(KvRef::Null);
        let got = Denoiser::denoise(pooled, x.view(), sc.view(), &t, &with_pool).expect("pooled");
        let want = Denoiser::denoise(plain, x.view(), sc.view(), &t, &with_host).expect("plain");
        let diff = common::max_abs_difference(&got, &want);
        assert!(diff <= 1e-5, "{what}: x0 differs by {diff}");
    };

    // Three images in one encoder call: a run of three slots after the null K/V's.
    let first = pooled
        .encode_images(pixels(0, 3, size).view())
        .expect("encodes");
    assert_eq!(first.iter().map(slot_of).collect::<Vec<_>>(), vec![1, 2, 3]);
    let host_first = host(&mut plain, 0, 3);
    check(
        &mut pooled,
        &mut plain,
        &first.iter().collect::<Vec<_>>(),
        &host_first.iter().collect::<Vec<_>>(),
        "three images",
    );
    let stats = pooled.kv_pool_stats().expect("a pool");
    assert_eq!(
        (stats.uploads, stats.resident),
        (1, 3),
        "only the null K/V was copied in"
    );

    // Its request done, the middle image's slot is free again, but a run of two needs
    // two free slots side by side: slots 4 and 5.
    let [a, b, c]: [ImageKv; 3] = first.try_into().expect("three");
    drop(b);
    let second = pooled
        .encode_images(pixels(3, 2, size).view())
        .expect("encodes");
    assert_eq!(second.iter().map(slot_of).collect::<Vec<_>>(), vec![4, 5]);
    let single = pooled
        .encode_images(pixels(5, 1, size).view())
        .expect("encodes");
    assert_eq!(slot_of(&single[0]), 2, "the freed slot is reused");

    // More images than the pool has slots: it grows, and what it held survives.
    let many = pooled
        .encode_images(pixels(6, 70, size).view())
        .expect("encodes");
    let stats = pooled.kv_pool_stats().expect("a pool");
    assert!(stats.grows >= 1 && stats.capacity >= 76, "{stats:?}");
    assert_eq!(stats.resident, 2 + 2 + 1 + 70);
    let host_second = host(&mut plain, 3, 2);
    let host_single = host(&mut plain, 5, 1);
    let host_many = host(&mut plain, 6, 70);
    check(
        &mut pooled,
        &mut plain,
        &[
            &a, &c, &second[0], &second[1], &single[0], &many[0], &many[69],
        ],
        &[
            &host_first[0],
            &host_first[2],
            &host_second[0],
            &host_second[1],
            &host_single[0],
            &host_many[0],
            &host_many[69],
        ],
        "after growing",
    );

    // Every request done: every slot but the null K/V's is free.
    drop((a, c, second, single, many));
    let again = pooled
        .encode_images(pixels(0, 1, size).view())
        .expect("encodes");
    assert_eq!(slot_of(&again[0]), 1);
    assert_eq!(pooled.kv_pool_stats().expect("a pool").resident, 1);
}

#[test]
fn a_pool_at_its_size_limit_hands_out_shorter_runs_then_refuses() {
    runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let null = Array3::<f32>::zeros((2, 3, 4));
    let mut pool = KvPool::new(ort::memory::Allocator::default(), &null, 4).expect("pool");
    pool.limit_slots(6);
    assert_eq!(pool.max_images(), 5);
    let take = |pool: &mut KvPool, count| -> Vec<ResidentKv> {
        let (first, got) = pool.reserve_run(count).expect("slots");
        (first..first + got)
            .map(|slot| pool.resident(slot))
            .collect()
    };
    let a = take(&mut pool, 3);
    assert_eq!(
        a.iter().map(ResidentKv::slot).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Needs a run of two: grows, but only to the limit of six slots.
    let b = take(&mut pool, 2);
    assert_eq!(b.iter().map(ResidentKv::slot).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(pool.stats.capacity, 6);
    // Slots 1 and 3 freed: no run of two left and no room to grow, so the longest
    // run it has (one slot, the lowest) instead of an error.
    let [one, two, three]: [ResidentKv; 3] = a.try_into().expect("three");
    drop((one, three));
    let c = take(&mut pool, 2);
    assert_eq!(c.iter().map(ResidentKv::slot).collect::<Vec<_>>(), [1]);
    let d = take(&mut pool, 2);
    assert_eq!(d.iter().map(ResidentKv::slot).collect::<Vec<_>>(), [3]);
    // Nothing free: a clear error.
    let full = pool.reserve_run(1).expect_err("full");
    assert!(full.contains("--max-batch-rows"), "{full}");
    drop((two, b, c, d));
    assert_eq!(pool.reserve_run(5).expect("all free again"), (1, 5));
}

/// `--cuda-graph`'s denoiser calls (padded to the next power-of-two row count, in
/// buffers bound once; nothing is captured on the CPU) against the plain path: the same
/// x0 at every row count, with host and encoder-written K/V, and a pool allocated at
/// its final size that refuses to grow instead of moving.
#[test]
fn fixed_shape_calls_match_the_plain_path_and_the_pool_never_moves() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle");
    let bundle = Bundle::load(&dir).expect("parity bundle loads");
    let m = &bundle.manifest;
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let size = m.image.size as usize;
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let opts = |kv_pool, cuda_graph| SessionOptions {
        device: DeviceChoice::Cpu,
        intra_op_threads: 1,
        row_parallelism: 1,
        kv_pool,
        cuda_graph,
        device_loop: false,
        max_batch_rows: 64,
    };
    let err = Models::load(&rt, &bundle, &opts(false, true)).expect_err("needs the pool");
    assert!(err.to_string().contains("--kv-pool"), "{err}");
    let unsized_calls = SessionOptions {
        max_batch_rows: 0,
        ..opts(true, true)
    };
    let err = Models::load(&rt, &bundle, &unsized_calls).expect_err("needs the largest call");
    assert!(err.to_string().contains("largest call"), "{err}");

    let mut fixed = Models::load(&rt, &bundle, &opts(true, true)).expect("sessions load");
    let mut plain = load(&bundle, false, 1);
    let slots = fixed.kv_pool_stats().expect("a pool").capacity;
    assert_eq!(slots, runtime::FIXED_KV_POOL_SLOTS);
    assert_eq!(fixed.max_images_in_flight(), slots - 1);

    let host: Vec<Arc<Array3<f32>>> = plain
        .encode(pixels(0, 6, size).view())
        .expect("encoder runs")
        .outer_iter()
        .map(|k| Arc::new(k.to_owned()))
        .collect();
    let resident = fixed
        .encode_images(pixels(0, 6, size).view())
        .expect("encoder writes into the pool");
    let mut padding = 0;
    for (n, rows) in [1usize, 2, 3, 5, 8, 9, 17, 3, 1].into_iter().enumerate() {
        let (x, sc, t) = common::call_inputs(n, rows, (l, d));
        // Every third row unconditional; odd calls read the encoder-written K/V.
        let image = |r: usize| (r % 3 != 2).then_some((r + n) % host.len());
        let want_kv: Vec<KvRef<'_>> = (0..rows)
            .map(|r| image(r).map_or(KvRef::Null, |i| KvRef::Image(&host[i])))
            .collect();
        let got_kv: Vec<KvRef<'_>> = if n % 2 == 1 {
            (0..rows)
                .map(|r| image(r).map_or(KvRef::Null, |i| resident[i].as_kv_ref()))
                .collect()
        } else {
            want_kv.clone()
        };
        let got = Denoiser::denoise(&mut fixed, x.view(), sc.view(), &t, &got_kv).expect("fixed");
        let want = Denoiser::denoise(&mut plain, x.view(), sc.view(), &t, &want_kv).expect("plain");
        assert_eq!(got.dim(), want.dim());
        let diff = common::max_abs_difference(&got, &want);
        assert!(diff <= 1e-5, "{rows} rows: x0 differs by {diff}");
        padding += rows.next_power_of_two() - rows;
    }
    let stats = fixed.fixed_shape_stats().expect("fixed-shape calls");
    assert_eq!(stats.calls, 9);
    assert_eq!(
        stats.buckets, 7,
        "1, 2, 4, ... 64 rows, set up at load: {stats:?}"
    );
    assert_eq!(stats.padding_rows, padding as u64);

    // The device keeps what it was sent: the same call twice copies its inputs once,
    // and a call that changes only x_t and t copies those two.
    let copies = |m: &Models| m.fixed_shape_stats().expect("fixed").input_copies;
    let kv = [KvRef::Image(&host[0]), KvRef::Null];
    let x = Array3::from_shape_fn((2, l, d), |(r, i, j)| ((r + i * j) % 7) as f32 / 7.0);
    let zeros = Array3::<f32>::zeros((2, l, d));
    let first = Denoiser::denoise(&mut fixed, x.view(), zeros.view(), &[7, 7], &kv).expect("runs");
    let before = copies(&fixed);
    let again = Denoiser::denoise(&mut fixed, x.view(), zeros.view(), &[7, 7], &kv).expect("runs");
    assert_eq!(copies(&fixed), before, "nothing changed");
    assert_eq!(first, again);
    let x2 = x.mapv(|v| v * 0.5);
    let got = Denoiser::denoise(&mut fixed, x2.view(), zeros.view(), &[9, 9], &kv).expect("runs");
    assert_eq!(copies(&fixed), before + 2, "x_t and t");
    let want = Denoiser::denoise(&mut plain, x2.view(), zeros.view(), &[9, 9], &kv).expect("runs");
    let diff = common::max_abs_difference(&got, &want);
    assert!(diff <= 1e-5, "after a partial copy: x0 differs by {diff}");

    // More distinct images in one call than the pool has slots: a clear error, no
    // growth (a captured graph would read the old address), and the next call works.
    let many: Vec<Arc<Array3<f32>>> = (0..slots).map(|_| Arc::new((*host[0]).clone())).collect();
    let kv: Vec<KvRef<'_>> = many.iter().map(KvRef::Image).collect();
    let x = Array3::<f32>::zeros((slots, l, d));
    let t = vec![10i64; slots];
    let err = Denoiser::denoise(&mut fixed, x.view(), x.view(), &t, &kv).expect_err("pool full");
    assert!(err.to_string().contains("full"), "{err}");
    let pool = fixed.kv_pool_stats().expect("a pool");
    assert_eq!((pool.capacity, pool.grows), (slots, 0));
    drop(many);
    let kv = [resident[0].as_kv_ref()];
    let x = Array3::<f32>::zeros((1, l, d));
    Denoiser::denoise(&mut fixed, x.view(), x.view(), &[5], &kv).expect("serves on");

    // A call above the largest fixed shape (the scheduler never makes one) is refused,
    // not set up on the fly after the captures.
    let x = Array3::<f32>::zeros((65, l, d));
    let kv = vec![KvRef::Null; 65];
    let err = Denoiser::denoise(&mut fixed, x.view(), x.view(), &[5; 65], &kv).expect_err("65");
    assert!(err.to_string().contains("go up to 64"), "{err}");
    Denoiser::denoise(&mut fixed, x.view(), x.view(), &[5; 65][..64], &kv[..64])
        .expect_err("x has 65 rows, t 64");
}

#[test]
fn an_f16_pool_holds_each_images_kv_exactly_as_f16_through_its_growth() {
    runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let item = (2, 3, 4);
    let values = |seed: usize| {
        Array3::from_shape_fn(item, |(a, b, c)| {
            ((seed * 31 + a * 7 + b * 3 + c) as f32) * 0.37 - 5.1
        })
    };
    let null = values(0);
    let mut pool =
        KvPool::with_element(ort::memory::Allocator::default(), &null, 2, KvElement::F16)
            .expect("pool");
    assert_eq!(pool.element(), KvElement::F16);
    // Six images in one call: uploaded from the host's f32, the pool doubling twice.
    let images: Vec<Arc<Array3<f32>>> = (1..=6).map(|i| Arc::new(values(i))).collect();
    let kv: Vec<KvRef<'_>> = std::iter::once(KvRef::Null)
        .chain(images.iter().map(KvRef::Image))
        .collect();
    let slots = pool.assign(&kv).expect("room");
    assert_eq!(pool.stats.grows, 2);
    assert_eq!(pool.stats.capacity, 8);
    let tensor = pool.tensor();
    let stored = tensor
        .try_extract_array::<half::f16>()
        .expect("an f16 pool");
    for (slot, want) in slots
        .iter()
        .zip(std::iter::once(&null).chain(images.iter().map(|a| &**a)))
    {
        let got = stored.index_axis(Axis(0), *slot as usize);
        let want = want.mapv(half::f16::from_f32);
        assert_eq!(got, want.view().into_dyn(), "slot {slot}");
    }
}
