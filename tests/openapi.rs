//! openapi.yaml and the server must describe the same API.

use std::collections::BTreeSet;

use ladic_serve::http::{ApiError, ROUTES};

fn spec() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml")
}

/// (METHOD, path) pairs under `paths:`; the file keeps paths at two spaces of
/// indentation and methods at four.
fn documented_routes(yaml: &str) -> BTreeSet<(String, String)> {
    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut routes = BTreeSet::new();
    let mut in_paths = false;
    let mut path: Option<String> = None;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
        } else if let (Some(m), Some(p)) = (line.strip_prefix("    "), &path) {
            let m = m.trim_end().trim_end_matches(':');
            if METHODS.contains(&m) {
                routes.insert((m.to_uppercase(), p.clone()));
            }
        }
    }
    routes
}

#[test]
fn routes_match_the_router() {
    let documented = documented_routes(&spec());
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn every_error_type_is_documented() {
    let yaml = spec();
    let errors = [
        ApiError::InvalidImage(String::new()),
        ApiError::MalformedRequest(String::new()),
        ApiError::PayloadTooLarge { limit: 0 },
        ApiError::UnsupportedMediaType(String::new()),
        ApiError::InvalidParameter(String::new()),
        ApiError::ImageTooLarge(String::new()),
        ApiError::Unauthorized,
        ApiError::NotFound,
        ApiError::MethodNotAllowed,
        ApiError::Overloaded,
        ApiError::NotReady(String::new()),
        ApiError::Timeout,
        ApiError::Inference(String::new()),
    ];
    for e in errors {
        assert!(
            yaml.contains(&format!("            - {}\n", e.error_type())),
            "error_type {} is not in openapi.yaml",
            e.error_type()
        );
        let status = e.status().as_u16();
        if !matches!(status, 404 | 405) {
            assert!(
                yaml.contains(&format!("\"{status}\":")),
                "status {status} is not in openapi.yaml"
            );
        }
    }
}
