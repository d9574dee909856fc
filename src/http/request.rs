//! Reading a caption request in any of its forms (raw image body, multipart, JSON with
//! base64) into image bytes plus parameters, and validating the parameters.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;

use super::error::ApiError;
use crate::sampler::SamplerParams;

pub use crate::sampler::{MAX_CANDIDATES, MAX_GUIDANCE, MAX_STEPS};

/// Sampling parameters a request may set; unset ones take the bundle's defaults.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionParams {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub back_refine: Option<bool>,
    pub candidates: Option<usize>,
    pub seed: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// Answer with Server-Sent Events (`POST /caption` only); unset follows `Accept`.
    pub stream: Option<bool>,
}

impl CaptionParams {
    /// `self` with every field `other` sets replaced.
    pub fn overridden_by(self, other: CaptionParams) -> CaptionParams {
        CaptionParams {
            steps: other.steps.or(self.steps),
            guidance: other.guidance.or(self.guidance),
            back_refine: other.back_refine.or(self.back_refine),
            candidates: other.candidates.or(self.candidates),
            seed: other.seed.or(self.seed),
            timeout_ms: other.timeout_ms.or(self.timeout_ms),
            stream: other.stream.or(self.stream),
        }
    }

    /// Sets one parameter from a text value (query strings and multipart fields).
    fn set_text(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ApiError> {
            v.trim().parse().map_err(|_| {
                ApiError::InvalidParameter(format!("{name}: cannot parse {:?}", clip(v, 40)))
            })
        }
        match name {
            "steps" => self.steps = Some(parse(name, value)?),
            "guidance" => self.guidance = Some(parse(name, value)?),
            "back_refine" => self.back_refine = Some(parse(name, value)?),
            "candidates" => self.candidates = Some(parse(name, value)?),
            "seed" => self.seed = Some(parse(name, value)?),
            "timeout_ms" => self.timeout_ms = Some(parse(name, value)?),
            "stream" => self.stream = Some(parse(name, value)?),
            other => {
                return Err(ApiError::InvalidParameter(format!(
                    "unknown parameter {:?}",
                    clip(other, 40)
                )));
            }
        }
        Ok(())
    }

    /// Parameters from a URL query string.
    pub fn from_query(query: Option<&str>) -> Result<CaptionParams, ApiError> {
        let mut params = CaptionParams::default();
        let Some(query) = query.filter(|q| !q.is_empty()) else {
            return Ok(params);
        };
        let pairs: Vec<(String, String)> = serde_urlencoded_pairs(query)?;
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs {
            // `steps=3&steps=4` is ambiguous: refused, as a field twice in a form or a
            // JSON body is.
            if !seen.insert(k.clone()) {
                return Err(ApiError::InvalidParameter(format!(
                    "parameter {:?} given more than once",
                    clip(&k, 40)
                )));
            }
            params.set_text(&k, &v)?;
        }
        Ok(params)
    }
}

fn serde_urlencoded_pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    let parsed: Result<axum::extract::Query<Vec<(String, String)>>, _> =
        axum::extract::Query::try_from_uri(
            &format!("/?{query}")
                .parse()
                .map_err(|_| ApiError::InvalidParameter("malformed query string".into()))?,
        );
    parsed
        .map(|q| q.0)
        .map_err(|e| ApiError::InvalidParameter(clip(&format!("malformed query string: {e}"), 200)))
}

/// The JSON body of `POST /caption`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionJson {
    #[serde(deserialize_with = "image_field")]
    pub image: String,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub back_refine: Option<bool>,
    pub candidates: Option<usize>,
    pub seed: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub stream: Option<bool>,
}

/// The JSON body of `POST /caption/batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchJson {
    #[serde(deserialize_with = "images_field")]
    pub images: Vec<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub back_refine: Option<bool>,
    pub candidates: Option<usize>,
    pub seed: Option<u64>,
    pub timeout_ms: Option<u64>,
    /// Refused when true (a batch does not stream), with a message that says so.
    pub stream: Option<bool>,
}

/// What a JSON body's `image` must be; a body whose `image` is not one is malformed
/// (400), not a parameter problem.
const IMAGE_FIELD: &str = "\"image\" must be a string: the image's bytes in base64, or a data URI";
/// The same for `images`.
const IMAGES_FIELD: &str =
    "\"images\" must be a list of strings: each image's bytes in base64, or a data URI";

fn image_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map_err(|_| serde::de::Error::custom(IMAGE_FIELD))
}

fn images_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d).map_err(|_| serde::de::Error::custom(IMAGES_FIELD))
}

macro_rules! params_of {
    ($v:expr) => {
        CaptionParams {
            steps: $v.steps,
            guidance: $v.guidance,
            back_refine: $v.back_refine,
            candidates: $v.candidates,
            seed: $v.seed,
            timeout_ms: $v.timeout_ms,
            stream: $v.stream,
        }
    };
}

impl CaptionJson {
    pub fn params(&self) -> CaptionParams {
        params_of!(self)
    }
}

impl BatchJson {
    pub fn params(&self) -> CaptionParams {
        params_of!(self)
    }
}

/// Parameters checked against their ranges and merged with the bundle defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub sampler: SamplerParams,
    pub seed: u64,
    pub timeout: Duration,
}

/// The largest seed the server picks by itself: 2^53 - 1, the largest integer a JSON
/// number keeps exactly in JavaScript (and any other reader that parses numbers as
/// doubles), so that a reported seed replays the caption from a browser too. Clients may
/// send any u64.
pub const MAX_RANDOM_SEED: u64 = (1 << 53) - 1;

fn random_seed() -> u64 {
    rand::random::<u64>() & MAX_RANDOM_SEED
}

pub fn resolve(
    p: &CaptionParams,
    defaults: &SamplerParams,
    default_timeout: Duration,
    max_timeout: Duration,
) -> Result<Resolved, ApiError> {
    let mut s = defaults.clone();
    if let Some(steps) = p.steps {
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::InvalidParameter(format!(
                "steps must be between 1 and {MAX_STEPS}, got {steps}"
            )));
        }
        s.steps = steps;
    }
    if let Some(w) = p.guidance {
        if !(w.is_finite() && (0.0..=MAX_GUIDANCE).contains(&w)) {
            return Err(ApiError::InvalidParameter(format!(
                "guidance must be between 0 and {MAX_GUIDANCE}, got {w}"
            )));
        }
        s.guidance = w;
    }
    if let Some(k) = p.candidates {
        if !(1..=MAX_CANDIDATES).contains(&k) {
            return Err(ApiError::InvalidParameter(format!(
                "candidates must be between 1 and {MAX_CANDIDATES}, got {k}"
            )));
        }
        s.candidates = k;
    }
    if let Some(br) = p.back_refine {
        s.back_refine.enabled = br;
    }
    let timeout = timeout(p, default_timeout, max_timeout)?;
    let seed = p.seed.unwrap_or_else(random_seed);
    Ok(Resolved {
        sampler: s,
        seed,
        timeout,
    })
}

/// The request's deadline, from now: `timeout_ms` if given (at most `max_timeout`),
/// else `default_timeout`.
pub fn timeout(
    p: &CaptionParams,
    default_timeout: Duration,
    max_timeout: Duration,
) -> Result<Duration, ApiError> {
    match p.timeout_ms {
        Some(0) => Err(ApiError::InvalidParameter(
            "timeout_ms must be positive".into(),
        )),
        Some(ms) if Duration::from_millis(ms) > max_timeout => Err(ApiError::InvalidParameter(
            format!("timeout_ms may be at most {}", max_timeout.as_millis()),
        )),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(default_timeout),
    }
}

/// The media type without parameters, lower-cased.
pub fn media_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(None);
    };
    let ct = ct.to_str().map_err(|_| {
        ApiError::UnsupportedMediaType("the Content-Type header is not plain ASCII text".into())
    })?;
    Ok(ct.split(';').next().map(|t| t.trim().to_ascii_lowercase()))
}

const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes plain base64 (standard or URL-safe, padding optional, line breaks
/// allowed) or a `data:<type>;base64,<data>` URI.
pub fn decode_base64_image(s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    // The scheme and the `;base64` marker are case-insensitive (RFC 2397).
    let data_uri = s
        .get(..5)
        .filter(|scheme| scheme.eq_ignore_ascii_case("data:"))
        .map(|_| &s[5..]);
    let payload = if let Some(rest) = data_uri {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::MalformedRequest("malformed data URI: no comma".into()))?;
        if !meta.to_ascii_lowercase().ends_with(";base64") {
            return Err(ApiError::MalformedRequest(
                "data URIs must be base64-encoded (data:<type>;base64,...)".into(),
            ));
        }
        data
    } else {
        s
    };
    // A copy without line breaks only where there are any.
    let cleaned: std::borrow::Cow<str> = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect::<String>()
            .into()
    } else {
        payload.into()
    };
    if cleaned.is_empty() {
        return Err(ApiError::MalformedRequest(
            "the image field is empty".into(),
        ));
    }
    let scheme = cleaned.split_once("://").map(|(scheme, _)| scheme);
    if scheme.is_some_and(|s| {
        !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_alphabetic())
    }) {
        return Err(ApiError::MalformedRequest(
            "the image is a URL: the server never fetches one; send the image's bytes as base64"
                .into(),
        ));
    }
    STANDARD_LENIENT
        .decode(cleaned.as_bytes())
        .or_else(|_| URL_SAFE_LENIENT.decode(cleaned.as_bytes()))
        .map_err(|e| ApiError::MalformedRequest(format!("the image is not valid base64: {e}")))
}

/// `s` cut to about `max` characters (the start and the end kept), so an error message
/// never carries a large piece of what the client sent (serde_json, for one, quotes
/// the offending value: a base64 image where a number was expected).
pub fn clip(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let tail = max / 3;
    let head = max - tail;
    let start: String = s.chars().take(head).collect();
    let end: String = s.chars().skip(n - tail).collect();
    format!("{start}…{end}")
}

/// Parses a JSON body, telling syntax errors (400) from wrong values (422).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // A UTF-8 byte order mark before the JSON, which RFC 8259 lets a reader ignore (some
    // Windows tools write one).
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // serde reads a struct from an array too, by position: a body must be an object.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(ApiError::MalformedRequest(
            "malformed JSON: the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        // In the API's words, not Rust's.
        let message = e
            .to_string()
            .replace("expected usize", "expected a whole number >= 0")
            .replace("expected u64", "expected a whole number >= 0")
            .replace("expected f64", "expected a number");
        // 400 for a body that is not the request's shape (not JSON, no image, an
        // image that is not a string; not an object is refused above); 422 for a
        // parameter of the wrong type or out of its type's range, or an unknown one, as
        // in the query string.
        let malformed = match e.classify() {
            serde_json::error::Category::Data => {
                message.starts_with("missing field")
                    || message.starts_with("duplicate field")
                    || message.starts_with(IMAGE_FIELD)
                    || message.starts_with(IMAGES_FIELD)
            }
            _ => !message.starts_with("number out of range"),
        };
        if malformed {
            ApiError::MalformedRequest(clip(&format!("malformed JSON: {message}"), 200))
        } else {
            ApiError::InvalidParameter(clip(&format!("invalid JSON body: {message}"), 200))
        }
    })
}

/// The `image` file field and any parameter fields of a multipart form.
pub async fn parse_multipart(
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(Bytes, CaptionParams), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(ct)
        .map_err(|e| ApiError::MalformedRequest(format!("malformed multipart request: {e}")))?;
    let stream =
        futures_util::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut image = None;
    let mut params = CaptionParams::default();
    let mut seen = std::collections::HashSet::new();
    let malformed = |e: multer::Error| {
        ApiError::MalformedRequest(clip(&format!("malformed multipart request: {e}"), 200))
    };
    while let Some(field) = form.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or("").to_string();
        if !seen.insert(name.clone()) {
            return Err(ApiError::MalformedRequest(clip(
                &format!("the multipart form has more than one field named {name:?}"),
                200,
            )));
        }
        if name == "image" {
            image = Some(field.bytes().await.map_err(malformed)?);
        } else {
            let value = field.text().await.map_err(malformed)?;
            params.set_text(&name, &value)?;
        }
    }
    let image = image.ok_or_else(|| {
        ApiError::MalformedRequest("the multipart form has no field named \"image\"".into())
    })?;
    Ok((image, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::BackRefineSpec;
    use base64::engine::general_purpose;

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

    #[test]
    fn picked_seeds_stay_exact_in_javascript_and_sent_ones_are_kept() {
        let (timeout, max) = (Duration::from_secs(1), Duration::from_secs(2));
        let none = CaptionParams::from_query(None).unwrap();
        let seeds: Vec<u64> = (0..200)
            .map(|_| resolve(&none, &defaults(), timeout, max).unwrap().seed)
            .collect();
        assert!(seeds.iter().all(|&s| s <= MAX_RANDOM_SEED), "{seeds:?}");
        // Not a constant: 200 draws of 53 bits do not repeat.
        assert!(seeds.windows(2).any(|w| w[0] != w[1]));
        let max_u64 = CaptionParams::from_query(Some(&format!("seed={}", u64::MAX))).unwrap();
        assert_eq!(
            resolve(&max_u64, &defaults(), timeout, max).unwrap().seed,
            u64::MAX
        );
    }

    #[test]
    fn query_params_parse_and_validate() {
        let p = CaptionParams::from_query(Some(
            "steps=5&guidance=0.5&back_refine=true&candidates=3&seed=9",
        ))
        .unwrap();
        let r = resolve(
            &p,
            &defaults(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(r.sampler.steps, 5);
        assert_eq!(r.sampler.guidance, 0.5);
        assert!(r.sampler.back_refine.enabled);
        assert_eq!(r.sampler.candidates, 3);
        assert_eq!(r.seed, 9);
        assert_eq!(r.timeout, Duration::from_secs(1));

        let e = CaptionParams::from_query(Some("steps=3&guidance=1&steps=4")).unwrap_err();
        assert_eq!(e.status(), 422);
        assert!(
            e.to_string().contains("\"steps\" given more than once"),
            "{e}"
        );

        for bad in [
            "steps=0",
            "steps=101",
            "guidance=-1",
            "guidance=11",
            "guidance=nan",
            "candidates=0",
            "candidates=9",
            "timeout_ms=0",
            "timeout_ms=3000",
        ] {
            let p = CaptionParams::from_query(Some(bad)).unwrap();
            let e = resolve(
                &p,
                &defaults(),
                Duration::from_secs(1),
                Duration::from_secs(2),
            )
            .unwrap_err();
            assert_eq!(e.status(), 422, "{bad}");
        }
        for bad in ["steps=abc", "stepz=3", "seed=-1", "back_refine=maybe"] {
            let e = CaptionParams::from_query(Some(bad)).unwrap_err();
            assert_eq!(e.status(), 422, "{bad}");
        }
    }

    #[test]
    fn body_params_override_query_params() {
        let q = CaptionParams {
            steps: Some(3),
            seed: Some(1),
            ..Default::default()
        };
        let b = CaptionParams {
            steps: Some(7),
            ..Default::default()
        };
        let m = q.overridden_by(b);
        assert_eq!((m.steps, m.seed), (Some(7), Some(1)));
    }

    #[test]
    fn base64_forms() {
        let raw = b"\x89PNG some bytes";
        let std = general_purpose::STANDARD.encode(raw);
        assert_eq!(decode_base64_image(&std).unwrap(), raw);
        assert_eq!(decode_base64_image(std.trim_end_matches('=')).unwrap(), raw);
        assert_eq!(
            decode_base64_image(&format!("data:image/png;base64,{std}")).unwrap(),
            raw
        );
        assert_eq!(
            decode_base64_image(&format!("DATA:image/png;BASE64,{std}")).unwrap(),
            raw
        );
        let url = general_purpose::URL_SAFE.encode([0xfbu8, 0xff, 0xfe]);
        assert_eq!(decode_base64_image(&url).unwrap(), [0xfb, 0xff, 0xfe]);
        assert_eq!(
            decode_base64_image("not base64 !!").unwrap_err().status(),
            400
        );
        assert_eq!(
            decode_base64_image("data:image/png,abc")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(decode_base64_image("").unwrap_err().status(), 400);
    }

    #[test]
    fn json_errors_are_classified() {
        assert_eq!(parse_json::<CaptionJson>(b"{").unwrap_err().status(), 400);
        // A byte order mark before the JSON is read past.
        let with_bom = parse_json::<CaptionJson>(b"\xEF\xBB\xBF{\"image\": \"x\", \"steps\": 3}");
        assert_eq!(with_bom.unwrap().params().steps, Some(3));
        assert_eq!(
            parse_json::<CaptionJson>(br#"{"image": "x", "steps": "many"}"#)
                .unwrap_err()
                .status(),
            422
        );
        assert_eq!(
            parse_json::<CaptionJson>(br#"{"image": "x", "bogus": 1}"#)
                .unwrap_err()
                .status(),
            422
        );
        assert!(parse_json::<CaptionJson>(br#"{"image": "x", "steps": 4}"#).is_ok());
        // Not the request's shape, or a field given twice (as in a multipart form): 400.
        for body in [
            &b"{}"[..],
            b"null",
            b"[]",
            b"3",
            br#"{"steps": 4}"#,
            br#"{"image": "x", "steps": 4, "steps": 5}"#,
            br#"{"image": 5}"#,
            br#"{"image": ["x"], "steps": 4}"#,
            // An array is read by position: it once captioned with steps 7.
            br#"["x", 7, null, null, null, 42, null, false]"#,
            b"[1, 2]",
        ] {
            let e = parse_json::<CaptionJson>(body).unwrap_err();
            assert_eq!(e.status(), 400, "{}: {e}", String::from_utf8_lossy(body));
        }
        assert_eq!(parse_json::<BatchJson>(b"{}").unwrap_err().status(), 400);
        for body in [&br#"{"images": "x"}"#[..], br#"{"images": [1]}"#] {
            let e = parse_json::<BatchJson>(body).unwrap_err();
            assert_eq!(e.status(), 400, "{e}");
            assert!(e.to_string().contains(IMAGES_FIELD), "{e}");
        }
        let e = parse_json::<CaptionJson>(br#"{"image": 5}"#).unwrap_err();
        assert!(e.to_string().contains(IMAGE_FIELD), "{e}");
        // Types in the API's words.
        let e = parse_json::<CaptionJson>(br#"{"image": "x", "steps": "many"}"#).unwrap_err();
        assert!(
            e.to_string().contains("expected a whole number >= 0"),
            "{e}"
        );
        assert!(!e.to_string().contains("usize"), "{e}");
        // A number no parameter can hold is a parameter problem, whichever its type.
        for body in [
            &br#"{"image": "x", "guidance": 1e400}"#[..],
            br#"{"image": "x", "steps": 1e23}"#,
            br#"{"image": "x", "seed": -1}"#,
        ] {
            let e = parse_json::<CaptionJson>(body).unwrap_err();
            assert_eq!(e.status(), 422, "{}: {e}", String::from_utf8_lossy(body));
        }
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn error_messages_do_not_echo_large_inputs() {
        let image = "QUFB".repeat(10_000);
        let body = format!(r#"{{"images": "{image}"}}"#);
        let msg = parse_json::<BatchJson>(body.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 300, "{msg}");
        let msg = parse_json::<CaptionJson>(
            format!(r#"{{"image": "x", "steps": "{image}"}}"#).as_bytes(),
        )
        .unwrap_err()
        .to_string();
        assert!(msg.len() < 300, "{msg}");
        let msg = CaptionParams::from_query(Some(&format!("steps={image}")))
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 100, "{msg}");
        let msg = CaptionParams::from_query(Some(&format!("{image}=1")))
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 100, "{msg}");
        // Invalid base64 names the offending byte's position, not the input.
        let msg = decode_base64_image(&format!("{image}%%%{image}"))
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 100 && !msg.contains("QUFB"), "{msg}");
        assert_eq!(clip("abcdef", 6), "abcdef");
        assert_eq!(clip("abcdefghij", 6), "abcd…ij");
    }
}
