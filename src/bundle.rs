//! The model bundle: `manifest.json` plus three ONNX graphs and a tokenizer.
//!
//! The manifest is the only contract between the Python exporter and this service
//! (docs/bundle.md), so everything is checked here, at load, with errors that name the
//! offending field: a bad bundle must stop the server before it reports ready, never
//! surface later as a shape error in the middle of a request.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The value of `format` every bundle carries.
pub const BUNDLE_FORMAT: &str = "ladic-bundle";
/// The `format_version`s this build can read. Version 2 adds the denoiser's
/// `unconditional_half` ([`GraphSpec::unconditional_half`]), which a version-1 reader
/// would ignore and so run wrong.
pub const SUPPORTED_FORMAT_VERSIONS: &[u64] = &[1, 2];
/// The first `format_version` that may set `unconditional_half`.
pub const UNCONDITIONAL_HALF_FORMAT_VERSION: u64 = 2;

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid bundle manifest")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format {found:?}; expected {BUNDLE_FORMAT:?}")]
    WrongFormat { path: PathBuf, found: String },
    #[error(
        "{path} has format_version {found}, which this build cannot read (it reads {SUPPORTED_FORMAT_VERSIONS:?}); use a matching ladic-serve release or re-export the bundle"
    )]
    UnsupportedVersion { path: PathBuf, found: u64 },
    #[error("bundle file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> BundleError {
    BundleError::Invalid(msg.into())
}

/// The resize filter named in the manifest; `bicubic` is Catmull-Rom, as PIL's is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSpec {
    pub size: u32,
    pub resize_filter: ResizeFilter,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextSpec {
    pub max_len: usize,
    pub latent_dim: usize,
    pub vocab_size: usize,
    pub cls_id: i64,
    pub sep_id: i64,
    pub pad_id: i64,
    pub period_id: i64,
    pub unk_id: i64,
    pub special_ids: Vec<i64>,
    pub tokenizer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub kind: String,
    pub beta_start: f64,
    pub beta_end: f64,
    pub num_timesteps: usize,
    pub train_noise_scale: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplerDefaults {
    pub steps: usize,
    pub time_shift: usize,
    pub guidance: f64,
    pub renoise_scale: f64,
    pub self_conditioning: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackRefineSpec {
    pub enabled: bool,
    pub keep_fraction: f64,
    pub trigger_t: usize,
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MbrSpec {
    pub candidates: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffuserSpec {
    pub layers: usize,
    pub hidden: usize,
    pub image_tokens: usize,
}

/// One axis of a tensor: a fixed size or a symbolic name such as `batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Float32,
    /// Only for the image K/V between the encoder and the denoiser
    /// ([`Manifest::kv_dtype`]).
    Float16,
    Int64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// The fixed sizes after the batch axis; `None` where an axis is symbolic.
    pub fn fixed_tail(&self) -> Vec<Option<i64>> {
        self.shape
            .iter()
            .skip(1)
            .map(|d| match d {
                Dim::Fixed(n) => Some(*n),
                Dim::Symbolic(_) => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphSpec {
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Denoiser only (docs/bundle.md): the batch is even and its second half attends to
    /// `image_kv[0]`, the null K/V, whatever `kv_index` says. Calls are laid out by
    /// [`crate::call_layout`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unconditional_half: bool,
}

impl GraphSpec {
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Graphs {
    pub encoder: GraphSpec,
    pub denoiser: GraphSpec,
    pub decoder: GraphSpec,
}

/// `manifest.json`, of a format version in [`SUPPORTED_FORMAT_VERSIONS`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u64,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_by: String,
    pub image: ImageSpec,
    pub text: TextSpec,
    pub schedule: ScheduleSpec,
    pub sampler: SamplerDefaults,
    pub back_refine: BackRefineSpec,
    pub mbr: MbrSpec,
    pub diffuser: DiffuserSpec,
    pub graphs: Graphs,
}

impl Manifest {
    /// Whether the denoiser takes `kv_index` (its `image_kv` is then a pool of distinct
    /// K/V that rows index into) rather than one `image_kv` row per input row.
    pub fn denoiser_gathers_kv(&self) -> bool {
        self.graphs.denoiser.input(names::KV_INDEX).is_some()
    }

    /// The element type of the image K/V that the encoder writes and the denoiser reads
    /// (float16 in bundles converted with `--kv-precision fp16`).
    pub fn kv_dtype(&self) -> DType {
        self.graphs
            .denoiser
            .input(names::IMAGE_KV)
            .map_or(DType::Float32, |s| s.dtype)
    }

    /// Whether the denoiser reads the second half of each call's rows as unconditional
    /// (see [`GraphSpec::unconditional_half`]).
    pub fn denoiser_unconditional_half(&self) -> bool {
        self.graphs.denoiser.unconditional_half
    }
}

/// A validated bundle with its files resolved to paths that exist.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub encoder_path: PathBuf,
    pub denoiser_path: PathBuf,
    pub decoder_path: PathBuf,
    pub tokenizer_path: PathBuf,
}

/// The tensor names the service calls the graphs with (docs/bundle.md).
pub mod names {
    pub const PIXELS: &str = "pixels";
    pub const IMAGE_KV: &str = "image_kv";
    pub const X_T: &str = "x_t";
    pub const SELF_COND: &str = "self_cond";
    pub const T: &str = "t";
    pub const X0: &str = "x0";
    pub const TOKEN_IDS: &str = "token_ids";
    pub const CONFIDENCE: &str = "confidence";
    /// Optional denoiser input: row i attends to `image_kv[kv_index[i]]`, so rows that
    /// share an image (guided pairs, MBR candidates, every unconditional row) send its
    /// K/V once per call.
    pub const KV_INDEX: &str = "kv_index";
}

impl Bundle {
    /// Reads and validates `dir/manifest.json` and checks that every file it names exists.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let path = dir.join("manifest.json");
        let text = fs::read_to_string(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest = parse_manifest(&text, &path)?;
        validate(&manifest)?;
        let resolve = |file: &str| -> Result<PathBuf, BundleError> {
            if Path::new(file).is_absolute() || file.contains("..") {
                return Err(invalid(format!(
                    "file {file:?} must be a plain name inside the bundle directory"
                )));
            }
            let p = dir.join(file);
            if p.is_file() {
                Ok(p)
            } else {
                Err(BundleError::MissingFile { path: p })
            }
        };
        Ok(Bundle {
            dir: dir.to_path_buf(),
            encoder_path: resolve(&manifest.graphs.encoder.file)?,
            denoiser_path: resolve(&manifest.graphs.denoiser.file)?,
            decoder_path: resolve(&manifest.graphs.decoder.file)?,
            tokenizer_path: resolve(&manifest.text.tokenizer)?,
            manifest,
        })
    }
}

/// Parses a manifest, checking `format` and `format_version` before the rest so that a
/// newer bundle gets a version error instead of a confusing missing-field error.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, BundleError> {
    let json_err = |source| BundleError::Json {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
    let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
    if format != BUNDLE_FORMAT {
        return Err(BundleError::WrongFormat {
            path: path.to_path_buf(),
            found: format.to_string(),
        });
    }
    let version = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if !SUPPORTED_FORMAT_VERSIONS.contains(&version) {
        return Err(BundleError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    serde_json::from_value(value).map_err(json_err)
}

fn expect_spec<'a>(
    graph: &'a GraphSpec,
    graph_name: &str,
    tensor: &str,
    is_input: bool,
    dtype: DType,
    tail: &[i64],
) -> Result<&'a TensorSpec, BundleError> {
    let kind = if is_input { "input" } else { "output" };
    let spec = if is_input {
        graph.input(tensor)
    } else {
        graph.output(tensor)
    }
    .ok_or_else(|| {
        invalid(format!(
            "graphs.{graph_name} has no {kind} named {tensor:?}"
        ))
    })?;
    if spec.dtype != dtype {
        return Err(invalid(format!(
            "graphs.{graph_name} {kind} {tensor:?} has dtype {:?}; expected {dtype:?}",
            spec.dtype
        )));
    }
    let found = spec.fixed_tail();
    let want: Vec<Option<i64>> = tail.iter().map(|&n| Some(n)).collect();
    if spec.shape.is_empty() || found != want {
        return Err(invalid(format!(
            "graphs.{graph_name} {kind} {tensor:?} has shape {:?}; expected [batch, {}]",
            spec.shape,
            tail.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(spec)
}

/// Checks the manifest is internally consistent, so later code may index without checks.
pub fn validate(m: &Manifest) -> Result<(), BundleError> {
    let img = &m.image;
    if img.size == 0 || img.size > 4096 {
        return Err(invalid(format!("image.size {} out of range", img.size)));
    }
    if img.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        || img.mean.iter().any(|v| !v.is_finite())
    {
        return Err(invalid("image.mean must be finite and image.std positive"));
    }
    let text = &m.text;
    if text.max_len == 0 || text.latent_dim == 0 {
        return Err(invalid("text.max_len and text.latent_dim must be positive"));
    }
    let s = &m.schedule;
    if s.kind != "linear" {
        return Err(invalid(format!(
            "schedule.kind {:?} is not supported (only \"linear\")",
            s.kind
        )));
    }
    if s.num_timesteps < 2 {
        return Err(invalid("schedule.num_timesteps must be at least 2"));
    }
    if !(0.0..1.0).contains(&s.beta_start) || !(0.0..1.0).contains(&s.beta_end) {
        return Err(invalid("schedule betas must lie in [0, 1)"));
    }
    // The defaults obey the limits requests do: a bundle must not make the service run
    // what no request could ask for, nor compute NaNs from a non-finite weight.
    use crate::sampler::{MAX_CANDIDATES, MAX_GUIDANCE, MAX_STEPS};
    let sp = &m.sampler;
    if !(1..=MAX_STEPS).contains(&sp.steps) {
        return Err(invalid(format!(
            "sampler.steps must be between 1 and {MAX_STEPS}, got {}",
            sp.steps
        )));
    }
    if !(sp.guidance.is_finite() && (0.0..=MAX_GUIDANCE).contains(&sp.guidance)) {
        return Err(invalid(format!(
            "sampler.guidance must be between 0 and {MAX_GUIDANCE}, got {}",
            sp.guidance
        )));
    }
    if !(sp.renoise_scale.is_finite() && sp.renoise_scale >= 0.0) {
        return Err(invalid(format!(
            "sampler.renoise_scale must be finite and not negative, got {}",
            sp.renoise_scale
        )));
    }
    if !(0.0..=1.0).contains(&m.back_refine.keep_fraction) {
        return Err(invalid("back_refine.keep_fraction must lie in [0, 1]"));
    }
    if !(1..=MAX_CANDIDATES).contains(&m.mbr.candidates) {
        return Err(invalid(format!(
            "mbr.candidates must be between 1 and {MAX_CANDIDATES}, got {}",
            m.mbr.candidates
        )));
    }

    let size = i64::from(img.size);
    let (l, d) = (text.max_len as i64, text.latent_dim as i64);
    let kv_tail = [
        2 * m.diffuser.layers as i64,
        m.diffuser.image_tokens as i64,
        m.diffuser.hidden as i64,
    ];
    use names::*;
    let g = &m.graphs;
    // The image K/V is float32, or float16 in both graphs (a pool the denoiser indexes).
    let kv_dtype = m.kv_dtype();
    if !matches!(kv_dtype, DType::Float32 | DType::Float16) {
        return Err(invalid(format!(
            "the image K/V has dtype {kv_dtype:?}; float32 or float16 expected"
        )));
    }
    if kv_dtype == DType::Float16 && !m.denoiser_gathers_kv() {
        return Err(invalid(
            "a float16 image K/V needs a denoiser that takes kv_index",
        ));
    }
    expect_spec(
        &g.encoder,
        "encoder",
        PIXELS,
        true,
        DType::Float32,
        &[3, size, size],
    )?;
    expect_spec(&g.encoder, "encoder", IMAGE_KV, false, kv_dtype, &kv_tail)?;
    expect_spec(&g.denoiser, "denoiser", X_T, true, DType::Float32, &[l, d])?;
    expect_spec(
        &g.denoiser,
        "denoiser",
        SELF_COND,
        true,
        DType::Float32,
        &[l, d],
    )?;
    expect_spec(&g.denoiser, "denoiser", T, true, DType::Int64, &[])?;
    expect_spec(&g.denoiser, "denoiser", IMAGE_KV, true, kv_dtype, &kv_tail)?;
    let gathers = m.denoiser_gathers_kv();
    if gathers {
        expect_spec(&g.denoiser, "denoiser", KV_INDEX, true, DType::Int64, &[])?;
    }
    if g.encoder.unconditional_half || g.decoder.unconditional_half {
        return Err(invalid("only the denoiser may set unconditional_half"));
    }
    if g.denoiser.unconditional_half {
        if !gathers {
            return Err(invalid(
                "the denoiser's unconditional_half needs its kv_index input",
            ));
        }
        if m.format_version < UNCONDITIONAL_HALF_FORMAT_VERSION {
            return Err(invalid(format!(
                "the denoiser's unconditional_half needs format_version \
                 {UNCONDITIONAL_HALF_FORMAT_VERSION} (older readers would ignore it)"
            )));
        }
    }
    expect_spec(&g.denoiser, "denoiser", X0, false, DType::Float32, &[l, d])?;
    expect_spec(&g.decoder, "decoder", X0, true, DType::Float32, &[l, d])?;
    expect_spec(&g.decoder, "decoder", TOKEN_IDS, false, DType::Int64, &[l])?;
    expect_spec(
        &g.decoder,
        "decoder",
        CONFIDENCE,
        false,
        DType::Float32,
        &[l],
    )?;
    for (name, graph) in [
        ("encoder", &g.encoder),
        ("denoiser", &g.denoiser),
        ("decoder", &g.decoder),
    ] {
        let expected = match name {
            "encoder" => (1, 1),
            "denoiser" if gathers => (5, 1),
            "denoiser" => (4, 1),
            _ => (1, 2),
        };
        if (graph.inputs.len(), graph.outputs.len()) != expected {
            return Err(invalid(format!(
                "graphs.{name} must have {} inputs and {} outputs",
                expected.0, expected.1
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The example manifest of docs/bundle.md, as plain JSON.
    pub(crate) fn example_manifest_json() -> serde_json::Value {
        serde_json::json!({
          "format": "ladic-bundle", "format_version": 1, "name": "scenes-tiny",
          "description": "test", "created_by": "test",
          "image": {"size": 112, "resize_filter": "bicubic",
                    "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]},
          "text": {"max_len": 40, "latent_dim": 64, "vocab_size": 52, "cls_id": 1, "sep_id": 2,
                   "pad_id": 0, "period_id": 7, "unk_id": 3, "special_ids": [0, 1, 2, 3, 4],
                   "tokenizer": "tokenizer.json"},
          "schedule": {"kind": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                       "num_timesteps": 1000, "train_noise_scale": 4.0},
          "sampler": {"steps": 10, "time_shift": 5, "guidance": 1.0, "renoise_scale": 1.0,
                      "self_conditioning": true},
          "back_refine": {"enabled": false, "keep_fraction": 0.5, "trigger_t": 599, "rounds": 1},
          "mbr": {"candidates": 1},
          "diffuser": {"layers": 4, "hidden": 128, "image_tokens": 49},
          "graphs": {
            "encoder": {"file": "encoder.onnx",
              "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 112, 112]}],
              "outputs": [{"name": "image_kv", "dtype": "float32", "shape": ["batch", 8, 49, 128]}]},
            "denoiser": {"file": "denoiser.onnx",
              "inputs": [
                {"name": "x_t", "dtype": "float32", "shape": ["batch", 40, 64]},
                {"name": "self_cond", "dtype": "float32", "shape": ["batch", 40, 64]},
                {"name": "t", "dtype": "int64", "shape": ["batch"]},
                {"name": "image_kv", "dtype": "float32", "shape": ["kv_slots", 8, 49, 128]},
                {"name": "kv_index", "dtype": "int64", "shape": ["batch"]}],
              "outputs": [{"name": "x0", "dtype": "float32", "shape": ["batch", 40, 64]}]},
            "decoder": {"file": "decoder.onnx",
              "inputs": [{"name": "x0", "dtype": "float32", "shape": ["batch", 40, 64]}],
              "outputs": [
                {"name": "token_ids", "dtype": "int64", "shape": ["batch", 40]},
                {"name": "confidence", "dtype": "float32", "shape": ["batch", 40]}]}
          }
        })
    }

    pub(crate) fn example_manifest() -> Manifest {
        let text = example_manifest_json().to_string();
        parse_manifest(&text, Path::new("manifest.json")).expect("example parses")
    }

    #[test]
    fn example_manifest_is_valid() {
        validate(&example_manifest()).expect("valid");
    }

    /// The sampler's defaults are read as the Python side writes them (f64): 0.9 read
    /// as an f32 differs from 0.9, and so did a re-noise coefficient in the last bit.
    #[test]
    fn sampler_defaults_keep_their_decimal_values() {
        let mut json = example_manifest_json();
        json["sampler"]["guidance"] = serde_json::json!(0.3);
        json["sampler"]["renoise_scale"] = serde_json::json!(0.9);
        let m = parse_manifest(&json.to_string(), Path::new("manifest.json")).unwrap();
        let params = crate::sampler::SamplerParams::defaults(&m);
        assert_eq!((params.guidance, params.renoise_scale), (0.3, 0.9));
    }

    /// A bundle's defaults obey the limits requests do.
    #[test]
    fn refuses_defaults_no_request_could_ask_for() {
        for (section, key, value, message) in [
            ("sampler", "steps", serde_json::json!(101), "sampler.steps"),
            ("sampler", "steps", serde_json::json!(0), "sampler.steps"),
            (
                "sampler",
                "guidance",
                serde_json::json!(10.5),
                "sampler.guidance",
            ),
            (
                "sampler",
                "guidance",
                serde_json::json!(-1.0),
                "sampler.guidance",
            ),
            (
                "sampler",
                "renoise_scale",
                serde_json::json!(-0.5),
                "sampler.renoise_scale",
            ),
            ("mbr", "candidates", serde_json::json!(9), "mbr.candidates"),
            ("mbr", "candidates", serde_json::json!(0), "mbr.candidates"),
        ] {
            let mut v = example_manifest_json();
            v[section][key] = value.clone();
            let m = parse_manifest(&v.to_string(), Path::new("m.json")).unwrap();
            let err = validate(&m).unwrap_err().to_string();
            assert!(err.contains(message), "{section}.{key} = {value}: {err}");
        }
        let mut v = example_manifest_json();
        v["sampler"]["steps"] = serde_json::json!(100);
        v["sampler"]["guidance"] = serde_json::json!(10.0);
        v["mbr"]["candidates"] = serde_json::json!(8);
        let m = parse_manifest(&v.to_string(), Path::new("m.json")).unwrap();
        validate(&m).expect("the limits themselves are allowed");
    }

    #[test]
    fn refuses_unknown_version_before_parsing_the_rest() {
        let text = r#"{"format": "ladic-bundle", "format_version": 3, "whatever": 1}"#;
        let err = parse_manifest(text, Path::new("m.json")).unwrap_err();
        assert!(matches!(
            err,
            BundleError::UnsupportedVersion { found: 3, .. }
        ));
        assert!(err.to_string().contains("format_version 3"));
    }

    #[test]
    fn refuses_other_formats() {
        let err = parse_manifest(r#"{"format": "onnx"}"#, Path::new("m.json")).unwrap_err();
        assert!(matches!(err, BundleError::WrongFormat { .. }));
    }

    #[test]
    fn catches_shape_mismatch() {
        let mut v = example_manifest_json();
        v["graphs"]["denoiser"]["inputs"][0]["shape"] = serde_json::json!(["batch", 41, 64]);
        let m = parse_manifest(&v.to_string(), Path::new("m.json")).unwrap();
        let err = validate(&m).unwrap_err().to_string();
        assert!(err.contains("x_t"), "{err}");
    }

    /// The denoiser as bundles were exported before `kv_index`: four inputs, one
    /// image_kv row per row.
    fn without_kv_index(manifest: &mut serde_json::Value) {
        let inputs = manifest["graphs"]["denoiser"]["inputs"]
            .as_array_mut()
            .unwrap();
        inputs.pop();
        inputs[3]["shape"][0] = serde_json::json!("batch");
    }

    #[test]
    fn kv_index_is_optional_but_checked_when_present() {
        assert!(example_manifest().denoiser_gathers_kv());
        // The older form: one image_kv row per denoiser row, four inputs.
        let mut v = example_manifest_json();
        without_kv_index(&mut v);
        let m = parse_manifest(&v.to_string(), Path::new("m.json")).unwrap();
        assert!(!m.denoiser_gathers_kv());
        validate(&m).expect("a denoiser without kv_index is valid");
        // A kv_index of the wrong type is refused.
        let mut v = example_manifest_json();
        v["graphs"]["denoiser"]["inputs"][4]["dtype"] = serde_json::json!("float32");
        let m = parse_manifest(&v.to_string(), Path::new("m.json")).unwrap();
        let err = validate(&m).unwrap_err().to_string();
        assert!(err.contains("kv_index"), "{err}");
    }

    #[test]
    fn unconditional_half_needs_version_2_and_kv_index() {
        assert!(!example_manifest().denoiser_unconditional_half());
        let parse = |v: &serde_json::Value| parse_manifest(&v.to_string(), Path::new("m.json"));
        let mut v = example_manifest_json();
        v["graphs"]["denoiser"]["unconditional_half"] = serde_json::json!(true);
        // A version-1 reader would ignore the key, so a version-1 bundle may not set it.
        let err = validate(&parse(&v).unwrap()).unwrap_err().to_string();
        assert!(err.contains("format_version 2"), "{err}");
        v["format_version"] = serde_json::json!(2);
        let m = parse(&v).unwrap();
        validate(&m).expect("valid at version 2");
        assert!(m.denoiser_unconditional_half());
        // Only with kv_index, and only on the denoiser.
        let mut old = v.clone();
        without_kv_index(&mut old);
        let err = validate(&parse(&old).unwrap()).unwrap_err().to_string();
        assert!(err.contains("kv_index"), "{err}");
        v["graphs"]["encoder"]["unconditional_half"] = serde_json::json!(true);
        let err = validate(&parse(&v).unwrap()).unwrap_err().to_string();
        assert!(err.contains("only the denoiser"), "{err}");
    }

    #[test]
    fn the_image_kv_may_be_float16_in_both_graphs_with_kv_index() {
        assert_eq!(example_manifest().kv_dtype(), DType::Float32);
        let parse = |v: &serde_json::Value| parse_manifest(&v.to_string(), Path::new("m.json"));
        let mut v = example_manifest_json();
        v["graphs"]["encoder"]["outputs"][0]["dtype"] = serde_json::json!("float16");
        v["graphs"]["denoiser"]["inputs"][3]["dtype"] = serde_json::json!("float16");
        let m = parse(&v).unwrap();
        validate(&m).expect("float16 K/V in both graphs");
        assert_eq!(m.kv_dtype(), DType::Float16);
        // Not in one graph only.
        let mut one = v.clone();
        one["graphs"]["encoder"]["outputs"][0]["dtype"] = serde_json::json!("float32");
        let err = validate(&parse(&one).unwrap()).unwrap_err().to_string();
        assert!(err.contains("image_kv"), "{err}");
        // Not for anything else.
        let mut x = v.clone();
        x["graphs"]["denoiser"]["inputs"][0]["dtype"] = serde_json::json!("float16");
        let err = validate(&parse(&x).unwrap()).unwrap_err().to_string();
        assert!(err.contains("x_t"), "{err}");
        // Not without kv_index.
        let mut old = v.clone();
        without_kv_index(&mut old);
        let err = validate(&parse(&old).unwrap()).unwrap_err().to_string();
        assert!(err.contains("kv_index"), "{err}");
    }

    #[test]
    fn catches_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("manifest.json"),
            example_manifest_json().to_string(),
        )
        .unwrap();
        let err = Bundle::load(dir.path()).unwrap_err();
        assert!(matches!(err, BundleError::MissingFile { .. }), "{err}");
    }
}
