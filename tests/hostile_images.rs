//! Images built to hurt: decompression bombs (tiny files that claim enormous sizes),
//! animations with thousands of frames, oversized frames. Each is refused or decoded
//! cheaply, and never makes the decoder allocate more than a small, fixed amount: this
//! test binary counts every allocation.
//!
//! The fixtures in tests/fixtures/hostile/ come from scripts/make-fuzz-corpus.py.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ladic_serve::bundle::{ImageSpec, ResizeFilter};
use ladic_serve::preprocess::{ImageLimits, PreprocessError, decode, preprocess};

/// The largest single allocation since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests run on parallel threads; measuring allocations needs them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` and returns its result with the largest allocation made meanwhile.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::SeqCst);
    let out = f();
    (out, LARGEST.load(Ordering::SeqCst))
}

const MIB: usize = 1 << 20;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hostile")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn spec() -> ImageSpec {
    ImageSpec {
        size: 112,
        resize_filter: ResizeFilter::Bicubic,
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

/// A GIF89a with a 2-colour palette; each frame `(w, h)` carries the LZW data of one
/// pixel, whatever size it claims.
fn gif(screen: (u16, u16), frames: &[(u16, u16)]) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&screen.0.to_le_bytes());
    out.extend_from_slice(&screen.1.to_le_bytes());
    out.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff]);
    for &(w, h) in frames {
        out.push(0x2c);
        for v in [0u16, 0, w, h] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0, 0x02, 0x02, 0x44, 0x01, 0x00]);
    }
    out.push(0x3b);
    out
}

fn assert_too_large(result: Result<impl std::fmt::Debug, PreprocessError>, what: &str) {
    match result {
        Err(PreprocessError::TooLarge { .. } | PreprocessError::TooMuchMemory) => {}
        other => panic!("{what}: expected a size refusal, got {other:?}"),
    }
}

#[test]
fn bombs_are_refused_from_the_header_without_allocating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limits = ImageLimits::default();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PNG 50000x50000", common::lying_png(50_000, 50_000)),
        // Within the side limit, 256 million pixels: over the pixel limit.
        ("PNG 16000x16000", common::lying_png(16_000, 16_000)),
        ("GIF 50000x50000", gif((50_000, 50_000), &[(1, 1)])),
        ("GIF 16000x16000", gif((16_000, 16_000), &[(1, 1)])),
        ("WebP 50000x50000", fixture("webp-claims-50000x50000.webp")),
        ("JPEG 60000x60000", fixture("jpeg-claims-60000x60000.jpg")),
    ];
    for (what, bytes) in cases {
        assert!(bytes.len() < 1024, "{what} is a small file");
        let (result, largest) = largest_allocation(|| decode(&bytes, &limits));
        assert!(largest < MIB, "{what}: allocated {largest} bytes at once");
        // Refused for its size, which the message gives as the header claims it.
        let claimed = what.split(' ').nth(1).unwrap();
        match result {
            Err(e @ PreprocessError::TooLarge { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("is {claimed};")), "{what}: {msg}");
            }
            other => panic!("{what}: expected a size refusal, got {other:?}"),
        }
    }
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_refused_without_allocating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The screen is 16x16 (passes the header check); the first frame claims
    // 65535x65535, which would need a 17 GB frame buffer.
    for bytes in [
        gif((16, 16), &[(65_535, 65_535)]),
        fixture("gif-huge-first-frame.gif"),
    ] {
        let (result, largest) =
            largest_allocation(|| decode(&bytes, &ImageLimits::default()).map(|_| ()));
        assert!(result.is_err(), "{result:?}");
        assert!(largest < 64 * MIB, "allocated {largest} bytes at once");
    }
}

/// Only the first frame of an animation is decoded: thousands of frames cost no more
/// than one, and frames after the first are not even parsed (a corrupt second frame
/// does not matter). So there is no frame-count limit to configure; the body limit
/// bounds the bytes a decoder may walk over.
#[test]
fn animations_decode_their_first_frame_only() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limits = ImageLimits::default();

    let mut many = gif((1, 1), &vec![(1, 1); 20_000]);
    // Past the first frame, garbage: never read. (Header 6 bytes, screen descriptor 7,
    // palette 6, then 15 per frame.)
    let first_frame_end = 6 + 7 + 6 + 15;
    for b in &mut many[first_frame_end..first_frame_end + 64] {
        *b = 0xA5;
    }
    for (what, bytes) in [
        ("GIF, 20000 frames, corrupt after the first", many),
        ("GIF, 2000 frames", fixture("gif-2000-frames.gif")),
        ("WebP, 2000 frames", fixture("webp-2000-frames.webp")),
    ] {
        let start = Instant::now();
        let (result, largest) = largest_allocation(|| preprocess(&bytes, &spec(), &limits));
        let elapsed = start.elapsed();
        let t = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(t.dim(), (3, 112, 112), "{what}");
        // One frame is tiny; decoding all of them would take far longer.
        assert!(elapsed < Duration::from_secs(2), "{what}: {elapsed:?}");
        assert!(
            largest < 4 * MIB,
            "{what}: allocated {largest} bytes at once"
        );
    }
}

#[test]
fn the_limits_are_the_configured_ones() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tight = ImageLimits {
        max_pixels: 100,
        max_side: 16,
        max_alloc_bytes: 1 << 20,
    };
    // 16x16 = 256 pixels: within the side limit, over the pixel limit.
    assert_too_large(decode(&gif((16, 16), &[(16, 16)]), &tight), "GIF 16x16");
    assert_too_large(decode(&common::lying_png(17, 1), &tight), "PNG 17x1");
    assert!(decode(&common::scene_png(0), &ImageLimits::default()).is_ok());

    // The counting allocator sees real decodes: 1000x1000 RGB is a 3 MB buffer.
    let big = common::encode(
        &image::DynamicImage::new_rgb8(1000, 1000),
        image::ImageFormat::Png,
    );
    let (result, largest) = largest_allocation(|| decode(&big, &ImageLimits::default()));
    assert!(result.is_ok());
    assert!(largest >= 3_000_000, "{largest}");
}
