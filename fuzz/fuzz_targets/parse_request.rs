//! The request parsers of src/http/request.rs: query strings, JSON bodies (single and
//! batch), base64 and data URIs, multipart forms and their Content-Type, and the
//! parameter validation behind them. The first byte picks the parser; the rest is its
//! input. Besides "no panic": accepted parameters are within their documented ranges,
//! and error messages stay short (they never echo a large part of the input).
#![no_main]

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, header};
use ladic_serve::bundle::BackRefineSpec;
use ladic_serve::http::ApiError;
use ladic_serve::http::request::{
    self, BatchJson, CaptionJson, CaptionParams, decode_base64_image, media_type, parse_json,
    parse_multipart,
};
use ladic_serve::sampler::SamplerParams;
use libfuzzer_sys::fuzz_target;

const MAX_TIMEOUT: Duration = Duration::from_secs(120);

fn defaults() -> SamplerParams {
    SamplerParams {
        steps: 10,
        guidance: 1.0,
        time_shift: 5,
        renoise_scale: 1.0,
        self_conditioning: true,
        back_refine: BackRefineSpec {
            enabled: false,
            keep_fraction: 0.5,
            trigger_t: 599,
            rounds: 1,
        },
        candidates: 1,
    }
}

/// Polls a future that never waits (the multipart stream is one ready chunk).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn check_error(e: &ApiError) {
    let msg = e.to_string();
    assert!(
        msg.len() <= 600,
        "error message of {} bytes: {msg}",
        msg.len()
    );
    assert!(
        matches!(e.status().as_u16(), 400 | 413 | 415 | 422),
        "parsing gave {e:?}"
    );
}

fn check_params(p: &CaptionParams) {
    match request::resolve(p, &defaults(), Duration::from_secs(30), MAX_TIMEOUT) {
        Ok(r) => {
            assert!((1..=request::MAX_STEPS).contains(&r.sampler.steps));
            assert!(r.sampler.guidance.is_finite());
            assert!((0.0..=request::MAX_GUIDANCE).contains(&r.sampler.guidance));
            assert!((1..=request::MAX_CANDIDATES).contains(&r.sampler.candidates));
            assert!(r.timeout > Duration::ZERO && r.timeout <= MAX_TIMEOUT);
        }
        Err(e) => check_error(&e),
    }
}

fn multipart(content_type: &[u8], body: &[u8]) {
    let mut headers = HeaderMap::new();
    let Ok(ct) = HeaderValue::from_bytes(content_type) else {
        return;
    };
    headers.insert(header::CONTENT_TYPE, ct);
    let _ = media_type(&headers);
    match block_on(parse_multipart(
        &headers,
        bytes::Bytes::copy_from_slice(body),
    )) {
        Ok((_image, params)) => check_params(&params),
        Err(e) => check_error(&e),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            let Ok(q) = std::str::from_utf8(input) else {
                return;
            };
            match CaptionParams::from_query(Some(q)) {
                Ok(p) => check_params(&p),
                Err(e) => check_error(&e),
            }
        }
        1 => match parse_json::<CaptionJson>(input) {
            Ok(json) => {
                check_params(&json.params());
                if let Err(e) = decode_base64_image(&json.image) {
                    check_error(&e);
                }
            }
            Err(e) => check_error(&e),
        },
        2 => match parse_json::<BatchJson>(input) {
            Ok(json) => {
                check_params(&json.params());
                for image in &json.images {
                    if let Err(e) = decode_base64_image(image) {
                        check_error(&e);
                    }
                }
            }
            Err(e) => check_error(&e),
        },
        3 => multipart(b"multipart/form-data; boundary=fuzzboundary", input),
        4 => {
            let Ok(s) = std::str::from_utf8(input) else {
                return;
            };
            if let Err(e) = decode_base64_image(s) {
                check_error(&e);
            }
        }
        _ => {
            // The Content-Type (up to the first newline) and the body both fuzzed.
            let split = input
                .iter()
                .position(|&b| b == b'\n')
                .unwrap_or(input.len());
            let (ct, body) = input.split_at(split);
            multipart(ct, body.get(1..).unwrap_or_default());
        }
    }
});
