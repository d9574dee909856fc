//! Minimum Bayes risk selection among caption candidates (docs/bundle.md).
//!
//! Similarities are exact fractions and their sums are compared exactly, as the Python
//! reference does (`fractions.Fraction`), so that equal scores tie whatever the order
//! of the additions, and the lowest index wins a tie on every platform.

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

/// A non-negative fraction in lowest terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fraction {
    num: u128,
    den: u128,
}

impl Fraction {
    fn new(num: u128, den: u128) -> Fraction {
        let g = gcd(num, den).max(1);
        Fraction {
            num: num / g,
            den: den / g,
        }
    }

    fn add(self, other: Fraction) -> Fraction {
        let g = gcd(self.den, other.den).max(1);
        let den = self.den / g * other.den;
        Fraction::new(self.num * (other.den / g) + other.num * (self.den / g), den)
    }

    /// `self > other`, exactly and without multiplying (the cross products of long
    /// captions' sums pass 2^128): integer parts first; if they are equal, the
    /// remainders `ra/b > rc/d` exactly when `d/rc > b/ra`, compared the same way (a
    /// continued-fraction comparison).
    fn greater_than(self, other: Fraction) -> bool {
        let (mut a, mut b, mut c, mut d) = (self.num, self.den, other.num, other.den);
        loop {
            let (qa, ra) = (a / b, a % b);
            let (qc, rc) = (c / d, c % d);
            if qa != qc {
                return qa > qc;
            }
            match (ra, rc) {
                (0, _) => return false,
                (_, 0) => return true,
                _ => (a, b, c, d) = (d, rc, b, ra),
            }
        }
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// F1 of the multisets of unigrams and bigrams together (two empty: 1, one empty: 0),
/// as a fraction: 2 * overlap / (grams of a + grams of b).
fn f1_fraction(a: &[i64], b: &[i64]) -> Fraction {
    if a.is_empty() && b.is_empty() {
        return Fraction::new(1, 1);
    }
    if a.is_empty() || b.is_empty() {
        return Fraction::new(0, 1);
    }
    let (ga, gb) = (grams(a), grams(b));
    let overlap: usize = ga
        .iter()
        .map(|(g, &n)| n.min(gb.get(g).copied().unwrap_or(0)))
        .sum();
    let total = (2 * a.len() - 1) + (2 * b.len() - 1);
    Fraction::new(2 * overlap as u128, total as u128)
}

/// F1 of the multisets of unigrams and bigrams together (two empty: 1, one empty: 0).
pub fn ngram_f1(a: &[i64], b: &[i64]) -> f64 {
    let f = f1_fraction(a, b);
    f.num as f64 / f.den as f64
}

/// Candidate `i`'s similarities to the others, added up.
fn similarity_sum(candidates: &[Vec<i64>], i: usize) -> Fraction {
    (0..candidates.len())
        .filter(|&j| j != i)
        .map(|j| f1_fraction(&candidates[i], &candidates[j]))
        .fold(Fraction::new(0, 1), Fraction::add)
}

/// Index of the candidate with the highest mean similarity to the others; ties go to
/// the lowest index.
pub fn choose(candidates: &[Vec<i64>]) -> usize {
    let k = candidates.len();
    if k <= 1 {
        return 0;
    }
    // The sums, not the means: every candidate's sum has the same k - 1 terms.
    let mut best = 0;
    let mut best_sum: Option<Fraction> = None;
    for i in 0..k {
        let sum = similarity_sum(candidates, i);
        if best_sum.is_none_or(|b| sum.greater_than(b)) {
            best = i;
            best_sum = Some(sum);
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
    fn equal_scores_tie_exactly_and_go_to_the_lowest_index() {
        // Candidates 0 and 1 both score 28/15 in all; added up in floating point, one
        // after the other, 0's sum came out one unit in the last place below 1's.
        let c = vec![
            vec![1, 2, 3, 5, 4],
            vec![2, 3, 4, 1, 2],
            vec![4, 4, 4, 4, 5, 3],
            vec![2, 2, 3, 1, 5, 1],
            vec![1, 3, 4, 1, 4, 5],
        ];
        assert_eq!(similarity_sum(&c, 0), similarity_sum(&c, 1));
        assert_eq!(similarity_sum(&c, 0), Fraction::new(28, 15));
        assert_eq!(choose(&c), 0);
    }

    /// Eight long captions over a few tokens: sums whose cross products pass 2^128
    /// (an overflow panics in a debug build), chosen as floating point chooses them
    /// where the best two are far from a tie.
    #[test]
    fn long_captions_are_compared_without_overflow() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as i64
        };
        for _ in 0..20 {
            let c: Vec<Vec<i64>> = (0..8)
                .map(|_| {
                    let len = 250 + (next() % 132) as usize;
                    (0..len).map(|_| next() % 6).collect()
                })
                .collect();
            let scores: Vec<f64> = (0..8)
                .map(|i| {
                    (0..8)
                        .filter(|&j| j != i)
                        .map(|j| ngram_f1(&c[i], &c[j]))
                        .sum()
                })
                .collect();
            let mut order: Vec<usize> = (0..8).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            if scores[order[0]] - scores[order[1]] > 1e-9 {
                assert_eq!(choose(&c), order[0], "{scores:?}");
            }
        }
        // The comparison itself, on fractions whose cross products overflow u128.
        let big = Fraction {
            num: 3 * (1 << 100) + 1,
            den: 1 << 100,
        };
        let bigger = Fraction {
            num: 3 * (1 << 100) + 2,
            den: 1 << 100,
        };
        assert!(bigger.greater_than(big) && !big.greater_than(bigger));
        assert!(!big.greater_than(big));
        let third = Fraction::new(1, 3);
        let near = Fraction {
            num: (1 << 120) + 1,
            den: 3 << 120,
        };
        assert!(near.greater_than(third) && !third.greater_than(near));
    }

    #[test]
    fn choose_picks_the_consensus_and_breaks_ties_low() {
        let c = vec![vec![9, 9, 9], vec![1, 2, 3], vec![1, 2, 4], vec![1, 2, 3]];
        assert_eq!(choose(&c), 1);
        assert_eq!(choose(&[vec![1], vec![2]]), 0);
        assert_eq!(choose(&[vec![5]]), 0);
    }
}
