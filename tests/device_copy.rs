//! The GPU copy path of the fixed-shape denoiser calls (src/device_copy.rs), run on the
//! CPU: a stand-in CUDA runtime library (tests/fixtures/fake-cudart), built here with
//! the C compiler, copies with memcpy, which is what cudaMemcpy does when both sides
//! are host memory. The same calls through host buffers and copies must give exactly
//! what the in-place CPU path gives, copy what changed and only that, and page-lock
//! every host buffer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ladic_serve::bundle::Bundle;
use ladic_serve::device_copy::CudaRuntime;
use ladic_serve::fixed_shapes::{FixedShapeCalls, Transfer};
use ladic_serve::kv_pool::KvPool;
use ladic_serve::runtime;
use ladic_serve::sampler::KvRef;
use ndarray::Array3;
use ort::memory::Allocator;
use ort::session::Session;

fn build_stand_in(out: &Path) -> PathBuf {
    let source =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-cudart/fake_cudart.c");
    let library = out.join("libfake_cudart.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("the C compiler runs");
    assert!(status.success(), "the stand-in CUDA runtime builds");
    library
}

/// Calls `name(arg)` of the stand-in.
fn call<A, R>(library: &libloading::Library, name: &str, arg: A) -> R {
    // SAFETY: the stand-in defines these functions with these signatures.
    let f = unsafe { library.get::<unsafe extern "C" fn(A) -> R>(name.as_bytes()) }
        .expect("stand-in function");
    // SAFETY: plain C functions.
    unsafe { f(arg) }
}

/// Host-to-device (1) or device-to-host (2) copies the stand-in has made.
fn copies(library: &libloading::Library, kind: i32) -> i64 {
    call(library, "fake_cudart_copies", kind)
}

/// Copies from unpinned host memory or to pinned memory as the device side, and
/// copies made before the previous upload was waited for.
fn misuse(library: &libloading::Library) -> i64 {
    let f = unsafe { library.get::<unsafe extern "C" fn() -> i64>(b"fake_cudart_misuse") }
        .expect("stand-in function");
    // SAFETY: a plain C function.
    unsafe { f() }
}

/// The stand-in, built and loaded, and a second handle on it to read its counters.
struct StandIn {
    cuda: &'static CudaRuntime,
    counters: libloading::Library,
    _dir: tempfile::TempDir,
}

fn stand_in() -> StandIn {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = build_stand_in(dir.path());
    let cuda = CudaRuntime::load_from(&path).expect("stand-in loads");
    // SAFETY: the same library, loaded again only to read its counters.
    let counters = unsafe { libloading::Library::new(&path) }.expect("stand-in loads");
    StandIn {
        cuda,
        counters,
        _dir: dir,
    }
}

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bundle")
}

#[test]
fn copies_through_host_buffers_match_the_in_place_path() {
    let StandIn {
        cuda,
        counters,
        _dir,
    } = stand_in();
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let dir = parity_dir();
    let bundle = Bundle::load(&dir).expect("parity bundle loads");
    let m = &bundle.manifest;
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let item = [
        2 * m.diffuser.layers,
        m.diffuser.image_tokens,
        m.diffuser.hidden,
    ];
    let session = || {
        Session::builder(rt.environment())
            .expect("builder")
            .commit_from_file(dir.join("denoiser.onnx"))
            .expect("denoiser loads")
    };
    let null = Array3::<f32>::zeros((item[0], item[1], item[2]));
    let mut pool = KvPool::new(Allocator::default(), &null, 8).expect("pool");
    let images: Vec<Arc<Array3<f32>>> = (0..3)
        .map(|i| {
            Arc::new(Array3::from_shape_fn(
                (item[0], item[1], item[2]),
                |(a, b, c)| (((i * 5 + a * 3 + b * 2 + c) % 19) as f32) / 9.0 - 1.0,
            ))
        })
        .collect();
    let refs: Vec<KvRef<'_>> = images.iter().map(KvRef::Image).collect();
    let slots = pool.assign(&refs).expect("K/V in the pool");

    let (mut s_place, mut s_copy) = (session(), session());
    let mut in_place = FixedShapeCalls::new(
        &mut s_place,
        &Allocator::default(),
        &pool.tensor(),
        (l, d),
        1..=16,
        false,
        Transfer::InPlace,
    )
    .expect("in-place buckets");
    let ups_before = copies(&counters, 1);
    let mut copied = FixedShapeCalls::new(
        &mut s_copy,
        &Allocator::default(),
        &pool.tensor(),
        (l, d),
        1..=16,
        false,
        Transfer::Cuda(cuda),
    )
    .expect("buckets with copies");
    assert_eq!(in_place.stats.pinned_host_buffers, 0);
    assert_eq!(
        copied.stats.pinned_host_buffers,
        5 * 5,
        "1..16 rows, 5 buffers each"
    );
    assert!(
        copies(&counters, 1) > ups_before,
        "set-up sends through the library"
    );

    let mut calls = 0;
    for (n, rows) in [1usize, 3, 16, 5, 2, 9].into_iter().enumerate() {
        let x = Array3::from_shape_fn((rows, l, d), |(r, i, j)| {
            (((n * 7 + r * 3 + i * 2 + j) % 17) as f32) / 8.0 - 1.0
        });
        // self_cond stays all zeros on odd calls, as without self-conditioning.
        let sc = Array3::from_shape_fn((rows, l, d), |(r, i, j)| {
            if n % 2 == 1 {
                0.0
            } else {
                ((r + i + j) % 5) as f32 / 10.0
            }
        });
        let t: Vec<i64> = (0..rows)
            .map(|r| ((n * 97 + r * 31) % 1000) as i64)
            .collect();
        let kv: Vec<i64> = (0..rows).map(|r| slots[(r + n) % 3]).collect();
        let (ups, downs) = (copies(&counters, 1), copies(&counters, 2));
        let want = in_place
            .run(&mut s_place, x.view(), sc.view(), &t, &kv)
            .expect("in place");
        let got = copied
            .run(&mut s_copy, x.view(), sc.view(), &t, &kv)
            .expect("with copies");
        calls += 1;
        assert_eq!(got, want, "{rows} rows");
        assert_eq!(copies(&counters, 2) - downs, 1, "one download: x0's rows");
        let sent = copies(&counters, 1) - ups;
        assert!((2..=4).contains(&sent), "{sent} uploads for {rows} rows");
    }
    assert_eq!(copied.stats.calls, calls);
    assert_eq!(copied.stats.input_copies, in_place.stats.input_copies);
    assert_eq!(copied.stats.padding_rows, in_place.stats.padding_rows);

    // The same call again sends nothing; a new t alone sends t.
    let x = Array3::<f32>::ones((2, l, d));
    let zeros = Array3::<f32>::zeros((2, l, d));
    let kv = [slots[0], 0];
    let first = copied.run(&mut s_copy, x.view(), zeros.view(), &[3, 3], &kv);
    let ups = copies(&counters, 1);
    let again = copied.run(&mut s_copy, x.view(), zeros.view(), &[3, 3], &kv);
    assert_eq!(copies(&counters, 1), ups, "nothing changed");
    assert_eq!(first.expect("runs"), again.expect("runs"));
    copied
        .run(&mut s_copy, x.view(), zeros.view(), &[4, 4], &kv)
        .expect("runs");
    assert_eq!(copies(&counters, 1), ups + 1, "only t");
    assert_eq!(
        misuse(&counters),
        0,
        "pinned host side, each upload waited for"
    );

    // When CUDA refuses to page-lock, the buffers stay pageable, the error is cleared
    // (ONNX Runtime would otherwise report it at its next check), and calls still work.
    call::<i32, ()>(&counters, "fake_cudart_refuse_pinning", 1);
    let mut s_pageable = session();
    let mut pageable = FixedShapeCalls::new(
        &mut s_pageable,
        &Allocator::default(),
        &pool.tensor(),
        (l, d),
        1..=4,
        false,
        Transfer::Cuda(cuda),
    )
    .expect("buckets without page-locking");
    call::<i32, ()>(&counters, "fake_cudart_refuse_pinning", 0);
    assert_eq!(pageable.stats.pinned_host_buffers, 0);
    let pending =
        unsafe { counters.get::<unsafe extern "C" fn() -> i32>(b"fake_cudart_pending_error") }
            .expect("stand-in function");
    // SAFETY: a plain C function.
    assert_eq!(unsafe { pending() }, 0, "no CUDA error left pending");
    let x = Array3::from_shape_fn((3, l, d), |(r, i, j)| ((r + 2 * i + j) % 9) as f32 / 4.0);
    let kv = [slots[1], slots[2], 0];
    let want = in_place
        .run(&mut s_place, x.view(), x.view(), &[5, 50, 500], &kv)
        .expect("in place");
    let got = pageable
        .run(&mut s_pageable, x.view(), x.view(), &[5, 50, 500], &kv)
        .expect("pageable");
    assert_eq!(got, want);
}

/// The device loop's GPU side (src/device_loop.rs) through the stand-in: rows' states
/// written into pool slots at an offset, the noise sent for the call's rows only, x0
/// read back. Step for step, the same x0 as the in-place loop, with every copy waited
/// for and every host side page-locked.
#[test]
fn the_device_loop_through_host_buffers_matches_the_in_place_loop() {
    use ladic_serve::device_loop::{DeviceLoopState, GATHER_GRAPH, UPDATE_GRAPH};
    use ladic_serve::sampler::{DeviceRow, StateSlot, Update};
    use ndarray::Array2;

    let StandIn {
        cuda,
        counters,
        _dir,
    } = stand_in();
    let rt = runtime::init_onnxruntime(None).expect("ONNX Runtime loads");
    let dir = parity_dir();
    let bundle = Bundle::load(&dir).expect("parity bundle loads");
    let m = &bundle.manifest;
    let (l, d) = (m.text.max_len, m.text.latent_dim);
    let item = (
        2 * m.diffuser.layers,
        m.diffuser.image_tokens,
        m.diffuser.hidden,
    );
    let session = |graph: Option<&[u8]>| {
        let mut b = Session::builder(rt.environment()).expect("builder");
        match graph {
            Some(bytes) => b.commit_from_memory(bytes),
            None => b.commit_from_file(dir.join("denoiser.onnx")),
        }
        .expect("session")
    };
    let image = Arc::new(Array3::from_shape_fn(item, |(a, b, c)| {
        (((a * 3 + b * 2 + c) % 19) as f32) / 9.0 - 1.0
    }));
    let mut pool = KvPool::new(Allocator::default(), &Array3::zeros(item), 4).expect("pool");
    let image_slot = pool.assign(&[KvRef::Image(&image)]).expect("slot")[0];

    // Two loops, one per transfer: (denoiser, fixed-shape calls, state).
    let mut loops = [Transfer::InPlace, Transfer::Cuda(cuda)].map(|transfer| {
        let mut denoiser = session(None);
        let mut calls = FixedShapeCalls::allocate(
            &mut denoiser,
            &Allocator::default(),
            &pool.tensor(),
            (l, d),
            1..=8,
            false,
            transfer,
        )
        .expect("buckets");
        let state = DeviceLoopState::new(
            session(Some(GATHER_GRAPH)),
            session(Some(UPDATE_GRAPH)),
            &mut calls,
            &Allocator::default(),
            (l, d),
            6,
            false,
        )
        .expect("device loop");
        calls.run_first(&mut denoiser).expect("first runs");
        let mut state = state;
        state.run_first(&mut calls).expect("first runs");
        (denoiser, calls, state)
    });
    let latent = |seed: usize| {
        Array2::from_shape_fn((l, d), |(i, j)| {
            (((seed * 7 + i * 3 + j) % 13) as f32) / 6.0 - 1.0
        })
    };
    // Three rows: guided and self-conditioned; unguided; guided without self_cond.
    let update = |row: usize, step: usize, renoise: bool| Update {
        guidance: (row != 1).then_some((2.0, 1.0)),
        keep_self_cond: row != 2,
        renoise: renoise.then(|| (0.8, 0.3, latent(100 + 10 * step + row))),
        needs_x0: true,
    };
    let mut slots: [Vec<Option<StateSlot>>; 2] = [vec![None, None, None], vec![None, None, None]];
    for step in 0..4 {
        let mut x0s = Vec::new();
        for (which, (denoiser, calls, state)) in loops.iter_mut().enumerate() {
            let rows: Vec<DeviceRow<'_>> = (0..3)
                .map(|r| DeviceRow {
                    slot: slots[which][r].as_ref().map(StateSlot::index),
                    // Each row starts with its state; row 1 restarts at step 2.
                    send_x: (step == 0 || (step == 2 && r == 1)).then(|| latent(r)),
                    send_self_cond: (step == 0).then(|| latent(50 + r)),
                    t_in: (900 - 200 * step) as i64,
                    kv: KvRef::Null,
                    update: update(r, step, step != 3),
                })
                .collect();
            let kv_index: Vec<i64> = (0..3)
                .flat_map(|r| {
                    if r == 1 {
                        vec![image_slot]
                    } else {
                        vec![image_slot, 0]
                    }
                })
                .collect();
            let out = state
                .step(calls, denoiser, rows, &kv_index, None)
                .expect("a step");
            for (slot, new) in slots[which].iter_mut().zip(out.new_slots) {
                if new.is_some() {
                    *slot = new;
                }
            }
            x0s.push(out.x0);
        }
        assert_eq!(x0s[0], x0s[1], "step {step}");
        assert!(x0s[0].iter().all(Option::is_some));
    }
    assert_eq!(loops[1].2.stats, loops[0].2.stats);
    assert_eq!(
        misuse(&counters),
        0,
        "pinned host side, each upload waited for"
    );
}
