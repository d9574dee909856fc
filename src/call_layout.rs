//! Where a denoiser call's rows go in the batch, for a bundle whose denoiser reads the
//! second half of its batch as the unconditional pass (`unconditional_half`,
//! docs/bundle.md).
//!
//! Such a denoiser attends to the null K/V (slot 0) once for all the rows of its second
//! half, as one long query, instead of copying it into every one of them. The service
//! therefore puts the rows on an image's K/V in the first half and the rows on the null
//! K/V in the second, and pads both halves to the same length. With guidance on, a call
//! holds as many of each, so nothing is padded; rows on the null K/V beyond half the
//! batch go into the first half, where they gather slot 0 like any other row. Rows
//! without guidance leave padding in the second half.

use std::ops::Range;

/// The batch rows of one call's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfLayout {
    /// The batch row of each of the call's rows, in the call's order.
    pub positions: Vec<usize>,
    /// Rows in the batch, even; those no row is placed at are padding.
    pub rows: usize,
}

impl HalfLayout {
    /// The layout of a call whose row i attends to the null K/V when `unconditional[i]`.
    /// `round_up`: the batch size the denoiser runs a call of `n` rows at (its
    /// fixed-shape bucket, or `n`); given an even `n`, it must return an even size of at
    /// least `n`.
    pub fn new(unconditional: &[bool], round_up: impl Fn(usize) -> usize) -> HalfLayout {
        let n = unconditional.len();
        let conditional = unconditional.iter().filter(|&&u| !u).count();
        let half = conditional.max(n.div_ceil(2)).max(1);
        let rows = round_up(2 * half);
        assert!(
            rows.is_multiple_of(2) && rows >= 2 * half,
            "a batch of {rows} rows for {} rows in each half",
            half
        );
        let half = rows / 2;
        let (mut first, mut second) = (0, half);
        let positions = unconditional
            .iter()
            .map(|&null| {
                let next = if null && second < rows {
                    &mut second
                } else {
                    &mut first
                };
                *next += 1;
                *next - 1
            })
            .collect();
        HalfLayout { positions, rows }
    }

    /// Batch rows that no row of the call is placed at.
    pub fn padding(&self) -> usize {
        self.rows - self.positions.len()
    }

    /// Whether a call of these rows fits a batch of `max_rows` rows (even).
    pub fn fits(unconditional: &[bool], max_rows: usize) -> bool {
        let conditional = unconditional.iter().filter(|&&u| !u).count();
        fits(unconditional.len(), conditional, max_rows)
    }

    /// `groups` (consecutive ranges of `unconditional` that cover it, each a run of rows
    /// that must stay in one call: a guided caption's two passes) cut, in order, into
    /// calls whose layouts each fit `max_rows` (even, at least 2): ranges of the groups.
    /// A group alone always makes a call, even one that does not fit (its caller reports
    /// that).
    pub fn split(
        unconditional: &[bool],
        groups: &[Range<usize>],
        max_rows: usize,
    ) -> Vec<Range<usize>> {
        let mut calls = Vec::new();
        let (mut start, mut rows, mut conditional) = (0, 0, 0);
        for (g, group) in groups.iter().enumerate() {
            let own = unconditional[group.clone()].iter().filter(|&&u| !u).count();
            if g > start && !fits(rows + group.len(), conditional + own, max_rows) {
                calls.push(start..g);
                (start, rows, conditional) = (g, 0, 0);
            }
            rows += group.len();
            conditional += own;
        }
        if start < groups.len() {
            calls.push(start..groups.len());
        }
        calls
    }
}

/// Whether `rows` rows, `conditional` of them on an image's K/V, fit a batch of
/// `max_rows` (even) laid out in halves: each half holds half the batch.
fn fits(rows: usize, conditional: usize, max_rows: usize) -> bool {
    2 * conditional <= max_rows && rows <= max_rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn power_of_two(n: usize) -> usize {
        n.next_power_of_two()
    }

    #[test]
    fn guided_pairs_fill_both_halves_without_padding() {
        // Three guided captions: conditional, unconditional, ... in call order.
        let flags = [false, true, false, true, false, true];
        let layout = HalfLayout::new(&flags, |n| n);
        assert_eq!(layout.rows, 6);
        assert_eq!(layout.positions, vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(layout.padding(), 0);
        // Rounded up to a bucket, both halves get the same padding.
        let layout = HalfLayout::new(&flags, power_of_two);
        assert_eq!(layout.rows, 8);
        assert_eq!(layout.positions, vec![0, 4, 1, 5, 2, 6]);
    }

    #[test]
    fn unguided_rows_leave_padding_and_extra_null_rows_go_first() {
        let layout = HalfLayout::new(&[false, false, false], |n| n);
        assert_eq!((layout.rows, layout.positions.clone()), (6, vec![0, 1, 2]));
        assert_eq!(layout.padding(), 3);
        // More rows on the null K/V than half the batch: the rest go in the first half.
        let layout = HalfLayout::new(&[true, true, true, false], |n| n);
        assert_eq!(layout.rows, 4);
        assert_eq!(layout.positions, vec![2, 3, 0, 1]);
        // One row still makes an even batch.
        assert_eq!(HalfLayout::new(&[true], |n| n).rows, 2);
        assert_eq!(HalfLayout::new(&[], |n| n).rows, 2);
    }

    #[test]
    fn every_row_gets_its_own_batch_row_and_the_second_half_is_null_only() {
        for mask in 0u32..(1 << 7) {
            for len in 0..=7 {
                let flags: Vec<bool> = (0..len).map(|i| mask >> i & 1 == 1).collect();
                let layout = HalfLayout::new(&flags, power_of_two);
                let half = layout.rows / 2;
                let mut seen = layout.positions.clone();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), len, "{flags:?}");
                for (&p, &null) in layout.positions.iter().zip(&flags) {
                    assert!(p < layout.rows);
                    assert!(p < half || null, "{flags:?}: a conditional row at {p}");
                }
                assert!(
                    HalfLayout::fits(&flags, layout.rows),
                    "{flags:?} fits its own layout"
                );
            }
        }
    }

    #[test]
    fn calls_are_split_where_the_next_group_would_not_fit() {
        // Groups: guided (2 rows), unguided (1), unguided, guided.
        let flags = [false, true, false, false, false, true];
        let groups = [0..2, 2..3, 3..4, 4..6];
        let calls = HalfLayout::split(&flags, &groups, 4);
        // 2 conditional rows fit 4; a third would need 6.
        assert_eq!(calls, vec![0..2, 2..4]);
        for call in &calls {
            let rows = groups[call.start].start..groups[call.end - 1].end;
            assert!(HalfLayout::fits(&flags[rows], 4));
        }
        // A group alone always makes a call, even if it cannot fit (the caller reports it).
        let calls = HalfLayout::split(&[false; 6], &[0..3, 3..6], 4);
        assert_eq!(calls, vec![0..1, 1..2]);
        assert!(HalfLayout::split(&[], &[], 4).is_empty());
    }
}
