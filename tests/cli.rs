//! The `ladic-serve` binary's `caption` command and its start-up errors.

mod common;

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ladic-serve"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

#[test]
fn caption_prints_one_line_per_image() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.jpg");
    std::fs::write(&a, common::scene_png(0)).unwrap();
    std::fs::write(
        &b,
        common::encode(&common::scene(1), image::ImageFormat::Jpeg),
    )
    .unwrap();
    let out = bin()
        .args(["caption", "--steps", "3", "--intra-op-threads", "1"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines.iter().all(|l| l.ends_with('.')));

    // Same seed, same captions.
    let again = bin()
        .args(["caption", "--steps", "3", "--intra-op-threads", "1"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
}

#[test]
fn missing_onnxruntime_is_a_one_line_error() {
    let out = bin()
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .args(["caption", "whatever.png"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("scripts/fetch-onnxruntime.sh"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn unknown_bundle_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("manifest.json"),
        r#"{"format": "ladic-bundle", "format_version": 99}"#,
    )
    .unwrap();
    let out = bin()
        .args(["caption", "--bundle"])
        .arg(dir.path())
        .arg("x.png")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("format_version 99"), "{stderr}");
}
