//! Token ids -> caption text (docs/bundle.md, "From ids to text").

use std::collections::HashSet;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::bundle::TextSpec;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TextError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("token id {0} is outside the vocabulary")]
    BadId(i64),
    #[error("tokenizer decode failed: {0}")]
    Decode(String),
}

/// Which ids never reach a caption.
#[derive(Debug, Clone)]
pub struct CleanRules {
    pub special_ids: HashSet<i64>,
    pub period_id: i64,
}

impl CleanRules {
    pub fn from_spec(spec: &TextSpec) -> CleanRules {
        CleanRules {
            special_ids: spec.special_ids.iter().copied().collect(),
            period_id: spec.period_id,
        }
    }

    fn drops(&self, id: i64) -> bool {
        id == self.period_id || self.special_ids.contains(&id)
    }

    /// Drops specials and every period, then collapses consecutive repeats.
    pub fn clean(&self, ids: &[i64]) -> Vec<i64> {
        let mut out: Vec<i64> = Vec::with_capacity(ids.len());
        for &id in ids {
            if self.drops(id) || out.last() == Some(&id) {
                continue;
            }
            out.push(id);
        }
        out
    }

    /// Mean confidence over the positions whose id is not dropped (0 if none).
    pub fn caption_confidence(&self, ids: &[i64], confidence: &[f32]) -> f32 {
        let kept: Vec<f64> = ids
            .iter()
            .zip(confidence)
            .filter(|(id, _)| !self.drops(**id))
            .map(|(_, &c)| f64::from(c))
            .collect();
        if kept.is_empty() {
            0.0
        } else {
            (kept.iter().sum::<f64>() / kept.len() as f64) as f32
        }
    }
}

/// Repeated words collapsed (a word split into several tokens repeats as a word, not
/// as a token: "skate ##board skate ##board"), spaces before punctuation removed,
/// trailing periods replaced by exactly one.
pub fn tidy(decoded: &str) -> String {
    // Python's `str.split()` (the reference) also splits at U+001C..U+001F.
    let space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let mut words: Vec<&str> = Vec::new();
    for word in decoded.split(space).filter(|w| !w.is_empty()) {
        if words.last() != Some(&word) {
            words.push(word);
        }
    }
    let mut text = words.join(" ");
    for p in [",", ".", ":", ";", "?", "!"] {
        text = text.replace(&format!(" {p}"), p);
    }
    let core = text.trim().trim_end_matches('.').trim();
    format!("{core}.")
}

/// The bundle's tokenizer plus the cleaning rules.
pub struct TextDecoder {
    tokenizer: Tokenizer,
    pub rules: CleanRules,
}

impl std::fmt::Debug for TextDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextDecoder")
            .field("rules", &self.rules)
            .finish()
    }
}

impl TextDecoder {
    pub fn load(path: &Path, spec: &TextSpec) -> Result<TextDecoder, TextError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| TextError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(TextDecoder {
            tokenizer,
            rules: CleanRules::from_spec(spec),
        })
    }

    /// Caption text for already cleaned ids.
    pub fn caption(&self, cleaned: &[i64]) -> Result<String, TextError> {
        let ids: Vec<u32> = cleaned
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| TextError::BadId(i)))
            .collect::<Result<_, _>>()?;
        let decoded = self
            .tokenizer
            .decode(&ids, true)
            .map_err(|e| TextError::Decode(e.to_string()))?;
        Ok(tidy(&decoded))
    }

    /// The vocabulary entry of one token id, as the tokenizer spells it.
    pub fn token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.tokenizer.id_to_token(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> TextDecoder {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/words.json");
        let tokenizer = Tokenizer::from_file(path).unwrap();
        TextDecoder {
            tokenizer,
            rules: CleanRules {
                special_ids: [0, 1, 2, 3, 4].into_iter().collect(),
                period_id: 12,
            },
        }
    }

    /// Expected values come from the Python reference (`clean_ids`, `ids_to_text`).
    #[test]
    fn matches_the_python_reference() {
        let d = decoder();
        let cases: [(&[i64], &[i64], &str); 5] = [
            (
                &[1, 5, 6, 6, 7, 13, 8, 9, 15, 10, 11, 12, 2, 0, 0],
                &[5, 6, 7, 13, 8, 9, 15, 10, 11],
                "a red circle, left of the blue square.",
            ),
            (&[1, 2, 0], &[], "."),
            (&[12, 12, 13, 5], &[13, 5], ", a."),
            (&[5, 13, 13, 6, 12, 6], &[5, 13, 6], "a, red."),
            // "skate ##board" twice: no id repeats, the word does.
            (
                &[1, 5, 16, 17, 16, 17, 12, 2],
                &[5, 16, 17, 16, 17],
                "a skateboard.",
            ),
        ];
        for (ids, want_clean, want_text) in cases {
            let clean = d.rules.clean(ids);
            assert_eq!(clean, want_clean);
            assert_eq!(d.caption(&clean).unwrap(), want_text);
        }
        let c = d
            .rules
            .caption_confidence(&[1, 5, 12, 6, 0], &[0.1, 0.5, 0.9, 0.25, 0.3]);
        assert!((c - 0.375).abs() < 1e-7);
        assert_eq!(d.rules.caption_confidence(&[0, 1], &[0.5, 0.5]), 0.0);
    }

    #[test]
    fn token_spellings() {
        let d = decoder();
        assert_eq!(d.token(5).as_deref(), Some("a"));
        assert_eq!(d.token(-1), None);
        assert_eq!(d.token(1_000_000), None);
    }

    #[test]
    fn bad_ids_are_errors_not_panics() {
        assert!(matches!(
            decoder().caption(&[-1]),
            Err(TextError::BadId(-1))
        ));
    }

    #[test]
    fn tidy_strips_trailing_periods() {
        assert_eq!(tidy("a cat . ."), "a cat.");
        assert_eq!(tidy("  a dog ! "), "a dog!.");
        assert_eq!(tidy("a dog dog , dog on on a mat"), "a dog, dog on a mat.");
        // Split as Python's str.split() splits: `"a\x1fcat\u3000cat".split()`.
        assert_eq!(tidy("a\u{1f}cat\u{3000}cat\u{a0}"), "a cat.");
    }
}
