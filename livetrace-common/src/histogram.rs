//! The log-linear latency histogram's bucket function, written once: the BPF program runs it on
//! every measured call and user space uses it (and its inverse) to read the buckets back.
//!
//! Values are nanoseconds. Below 32 every value has a bucket of its own; above, each power of two
//! `[2^k, 2^(k+1))` is split into 32 equal sub-buckets, so a bucket is never wider than 1/32 of
//! the values it holds (3.1% resolution). Values from 2^40 ns (about 18 minutes) up share one
//! overflow bucket; the exact maximum is tracked separately. No loops, no division: the verifier
//! accepts it as straight-line code.

/// Sub-buckets per power of two, as a power of two.
pub const SUB_BUCKET_BITS: u32 = 5;
/// Sub-buckets per power of two (32).
pub const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Values at or above `2^MAX_EXPONENT` ns go to [`OVERFLOW_BUCKET`].
pub const MAX_EXPONENT: u32 = 40;
/// Number of buckets, the overflow bucket included.
pub const BUCKETS: usize =
    ((MAX_EXPONENT - SUB_BUCKET_BITS + 1) as usize) * SUB_BUCKETS as usize + 1;
/// The last bucket: `[2^MAX_EXPONENT, u64::MAX]`.
pub const OVERFLOW_BUCKET: u32 = BUCKETS as u32 - 1;

/// The bucket holding `value`.
#[inline(always)]
pub fn bucket_index(value: u64) -> u32 {
    if value < SUB_BUCKETS {
        return value as u32;
    }
    if value >> MAX_EXPONENT != 0 {
        return OVERFLOW_BUCKET;
    }
    // SUB_BUCKET_BITS..MAX_EXPONENT-1; the value is nonzero so this cannot underflow.
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BUCKET_BITS;
    let sub = ((value >> shift) & (SUB_BUCKETS - 1)) as u32;
    ((shift + 1) << SUB_BUCKET_BITS) + sub
}

/// The smallest value in bucket `index`.
pub const fn bucket_low(index: u32) -> u64 {
    if index >= OVERFLOW_BUCKET {
        return 1 << MAX_EXPONENT;
    }
    let group = index >> SUB_BUCKET_BITS;
    let sub = (index as u64) & (SUB_BUCKETS - 1);
    if group == 0 {
        sub
    } else {
        (SUB_BUCKETS + sub) << (group - 1)
    }
}

/// One past the largest value in bucket `index` (`u64::MAX` for the overflow bucket, whose
/// upper end is open).
pub const fn bucket_high(index: u32) -> u64 {
    if index >= OVERFLOW_BUCKET {
        return u64::MAX;
    }
    if index + 1 == OVERFLOW_BUCKET {
        return 1 << MAX_EXPONENT;
    }
    bucket_low(index + 1)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    /// Bucket bounds tile the value range with no gap or overlap, and increase monotonically.
    #[test]
    fn bounds_are_contiguous_and_monotonic() {
        assert_eq!(bucket_low(0), 0);
        for index in 0..OVERFLOW_BUCKET {
            assert!(bucket_low(index) < bucket_high(index), "bucket {index}");
            assert_eq!(bucket_high(index), bucket_low(index + 1), "bucket {index}");
        }
        assert_eq!(bucket_low(OVERFLOW_BUCKET), 1 << MAX_EXPONENT);
        assert_eq!(bucket_high(OVERFLOW_BUCKET), u64::MAX);
    }

    /// Every value lands in the bucket whose [low, high) contains it, at every bucket edge and
    /// just around it, and at the extremes.
    #[test]
    fn every_value_lands_in_its_bucket() {
        let mut values: Vec<u64> = vec![0, 1, u64::MAX, (1 << MAX_EXPONENT) - 1, 1 << MAX_EXPONENT];
        for index in 0..BUCKETS as u32 {
            let low = bucket_low(index);
            values.extend([low, low.saturating_sub(1), low + 1]);
        }
        // A deterministic spread of values in between (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        for value in values {
            let index = bucket_index(value);
            assert!((index as usize) < BUCKETS, "{value} -> {index}");
            let (low, high) = (bucket_low(index), bucket_high(index));
            assert!(
                low <= value && (value < high || index == OVERFLOW_BUCKET),
                "{value} in bucket {index} = [{low}, {high})"
            );
        }
    }

    /// A bucket never spans more than 1/16 of the values it holds (here: 1/32): below 32 ns each
    /// bucket is a single value (exact); from 32 ns up its width is at most 1/32 of its low end.
    #[test]
    fn resolution_is_at_most_one_sixteenth() {
        for index in 0..OVERFLOW_BUCKET {
            let (low, high) = (bucket_low(index), bucket_high(index));
            if low < SUB_BUCKETS {
                assert_eq!(high - low, 1, "bucket {index}");
            } else {
                assert!((high - low) * 32 <= low, "bucket {index} = [{low}, {high})");
                assert!((high - low) * 16 <= low, "bucket {index} = [{low}, {high})");
            }
        }
        for k in SUB_BUCKET_BITS..MAX_EXPONENT {
            let first = bucket_index(1 << k);
            let last = bucket_index((1 << (k + 1)) - 1);
            assert_eq!(last - first + 1, SUB_BUCKETS as u32, "2^{k}");
        }
    }
}
