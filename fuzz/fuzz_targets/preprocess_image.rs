//! Image bytes -> encoder tensor, with the server's default limits: any input must give
//! a tensor of the bundle's shape with finite values, or an error; never a panic, a
//! hang or an allocation beyond the limits (libFuzzer's -rss_limit_mb catches those).
//! The decode memory estimate (read from the header alone) must not panic either, and
//! must exist for every image that decodes: the server reserves memory by it.
#![no_main]

use ladic_serve::bundle::{ImageSpec, ResizeFilter};
use ladic_serve::preprocess::{ImageLimits, decode_memory_estimate, preprocess};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The default bundle's preprocessing (models/scenes-tiny/manifest.json).
    let spec = ImageSpec {
        size: 112,
        resize_filter: ResizeFilter::Bicubic,
        mean: [0.481, 0.458, 0.408],
        std: [0.269, 0.261, 0.276],
    };
    let limits = ImageLimits::default();
    let estimate = decode_memory_estimate(data, &limits);
    if let Ok(t) = preprocess(data, &spec, &limits) {
        assert_eq!(t.dim(), (3, 112, 112));
        assert!(t.iter().all(|v| v.is_finite()));
        assert!(
            estimate.is_some(),
            "an image that decodes has a memory estimate"
        );
    }
});
