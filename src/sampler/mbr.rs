//! Minimum Bayes risk selection among caption candidates (docs/bundle.md).
//!
//! The arithmetic follows the Python reference operation for operation, because the
//! choice hinges on exact float ties.

use std::collections::HashMap;

#[derive(Hash, PartialEq, Eq)]
enum Gram {
    Uni(i64),
    Bi(i64, i64),
}

fn grams(ids: &[i64]) -> HashMap<Gram, usize> {
    let mut m = HashMap::new();
    for &i in ids {
        *m.entry(Gram::Uni(i)).or_insert(0) += 1;
    }
    for w in ids.windows(2) {
        *m.entry(Gram::Bi(w[0], w[1])).or_insert(0) += 1;
    }
    m
}

/// F1 of the multisets of unigrams and bigrams together (two empty: 1, one empty: 0).
pub fn ngram_f1(a: &[i64], b: &[i64]) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let (ga, gb) = (grams(a), grams(b));
    let overlap: usize = ga
        .iter()
        .map(|(g, &n)| n.min(gb.get(g).copied().unwrap_or(0)))
        .sum();
    if overlap == 0 {
        return 0.0;
    }
    let total_a = (2 * a.len() - 1) as f64;
    let total_b = (2 * b.len() - 1) as f64;
    let p = overlap as f64 / total_a;
    let r = overlap as f64 / total_b;
    2.0 * p * r / (p + r)
}

/// Index of the candidate with the highest mean similarity to the others; ties go to
/// the lowest index.
pub fn choose(candidates: &[Vec<i64>]) -> usize {
    let k = candidates.len();
    if k <= 1 {
        return 0;
    }
    let mut best = 0;
    let mut best_score = -1.0f64;
    for i in 0..k {
        let mut sum = 0.0f64;
        for j in (0..k).filter(|&j| j != i) {
            sum += ngram_f1(&candidates[i], &candidates[j]);
        }
        let score = sum / (k - 1) as f64;
        if score > best_score {
            best = i;
            best_score = score;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_edge_cases() {
        assert_eq!(ngram_f1(&[], &[]), 1.0);
        assert_eq!(ngram_f1(&[1], &[]), 0.0);
        assert_eq!(ngram_f1(&[1, 2, 3], &[1, 2, 3]), 1.0);
        assert_eq!(ngram_f1(&[1], &[2]), 0.0);
        // a: {1,2,(1,2)} b: {2,1,(2,1)}: overlap 2 of 3 each.
        assert!((ngram_f1(&[1, 2], &[2, 1]) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn choose_picks_the_consensus_and_breaks_ties_low() {
        let c = vec![vec![9, 9, 9], vec![1, 2, 3], vec![1, 2, 4], vec![1, 2, 3]];
        assert_eq!(choose(&c), 1);
        assert_eq!(choose(&[vec![1], vec![2]]), 0);
        assert_eq!(choose(&[vec![5]]), 0);
    }
}
