//! The queue: waiting requests in the order launchers take them
//! (priority, relative priority, then sequence), sorted on packed integer
//! keys instead of id strings.

use super::request_order;

/// A string of fewer than `width` (at most 16) bytes as an integer of
/// `width` bytes that compares like the string: its bytes from the top,
/// zero-padded, then its length in the last byte (equal padded bytes mean
/// one string is the other plus NULs, and the shorter sorts first).
fn packed(s: &str, width: usize) -> Option<u128> {
    let b = s.as_bytes();
    let n = b.len();
    if n >= width || width > 16 {
        return None;
    }
    let (head, tail) = b.split_at(n.min(8));
    let v = u128::from(be_prefix(head)) << 64 | u128::from(be_prefix(tail));
    Some(v >> (8 * (16 - width)) | n as u128)
}

/// Up to 8 bytes from the top of a big-endian word, zero-padded.
fn be_prefix(b: &[u8]) -> u64 {
    match b.first_chunk::<8>() {
        Some(w) => u64::from_be_bytes(*w),
        // Shifted in byte by byte: a copying loop would become a memcpy call.
        None => b
            .iter()
            .enumerate()
            .fold(0, |v, (k, &c)| v | u64::from(c) << (56 - 8 * k)),
    }
}

/// Sorts requests into queue order ([`request_order`] of the id and
/// relative priority `order` gives for each), stably.
///
/// Request ids are short, so the order is usually a tuple of integers
/// (comparing thousands of ids as strings was a tenth of a pass). There are
/// few (priority, relative priority) groups, and listings come in sequence
/// order, so requests are bucketed by group and each bucket is usually
/// sorted already.
pub(super) fn sort_queue<T: Copy>(reqs: &mut Vec<T>, order: impl Fn(&T) -> (&str, i64)) {
    /// Beyond this many groups a plain sort is as good.
    const MAX_GROUPS: usize = 16;
    let by_string = |reqs: &mut Vec<T>| reqs.sort_by(|a, b| full(&order, a).cmp(&full(&order, b)));
    let mut keys: Vec<(u64, i64, u128)> = Vec::with_capacity(reqs.len());
    for r in reqs.iter() {
        let (prio, rp, seq) = full(&order, r);
        let prio = packed(prio, 8).and_then(|p| u64::try_from(p).ok());
        let (Some(prio), Some(seq)) = (prio, packed(seq, 16)) else {
            return by_string(reqs);
        };
        keys.push((prio, rp, seq));
    }
    let mut groups: Vec<(u64, i64)> = Vec::new();
    let mut group_of: Vec<usize> = Vec::with_capacity(keys.len());
    for &(prio, rp, _) in &keys {
        let g = match groups.iter().position(|&g| g == (prio, rp)) {
            Some(g) => g,
            None if groups.len() < MAX_GROUPS => {
                groups.push((prio, rp));
                groups.len() - 1
            }
            None => {
                // Positions last: the keys are distinct, so unstable is stable.
                let mut all: Vec<(u64, i64, u128, usize)> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &(p, rp, seq))| (p, rp, seq, i))
                    .collect();
                all.sort_unstable();
                *reqs = all.iter().map(|k| reqs[k.3]).collect();
                return;
            }
        };
        group_of.push(g);
    }
    // Where each group starts in the sorted queue.
    let mut rank: Vec<usize> = (0..groups.len()).collect();
    rank.sort_unstable_by_key(|&g| groups[g]);
    let mut start = vec![0; groups.len()];
    let mut sizes = vec![0; groups.len()];
    for &g in &group_of {
        sizes[g] += 1;
    }
    let mut at = 0;
    for &g in &rank {
        start[g] = at;
        at += sizes[g];
    }
    let mut next = start.clone();
    let mut queue: Vec<(u128, usize)> = vec![(0, 0); keys.len()];
    for (i, (&g, &(_, _, seq))) in group_of.iter().zip(&keys).enumerate() {
        queue[next[g]] = (seq, i);
        next[g] += 1;
    }
    for g in 0..groups.len() {
        let bucket = &mut queue[start[g]..start[g] + sizes[g]];
        if !bucket.is_sorted() {
            bucket.sort_unstable();
        }
    }
    *reqs = queue.iter().map(|&(_, i)| reqs[i]).collect();
}

/// The [`request_order`] of a request.
fn full<'t, T>(order: &impl Fn(&T) -> (&str, i64), r: &'t T) -> (&'t str, i64, &'t str) {
    let (id, rp) = order(r);
    request_order(id, rp)
}

#[cfg(test)]
mod tests {
    use super::{packed, sort_queue};
    use crate::planner::request_order;

    #[test]
    fn packed_strings_order_like_strings() {
        let words = [
            "",
            "\0",
            "\0\0",
            "a",
            "a\0",
            "a\0\0",
            "ab",
            "~",
            "100",
            "0000000001",
            "0000000001\0",
            "0123456789abcde",
            "0123456789abcdf",
            "é",
            "\u{10ffff}",
        ];
        for a in words {
            for b in words {
                let (pa, pb) = (packed(a, 16), packed(b, 16));
                assert_eq!(pa.cmp(&pb), a.cmp(b), "{a:?} {b:?}");
            }
        }
        assert_eq!(packed("0123456789abcdef", 16), None);
        assert_eq!(
            packed("1234567", 8),
            Some(u128::from(u64::from_be_bytes(*b"1234567\x07")))
        );
        assert_eq!(packed("12345678", 8), None);
        for a in ["", "a", "ab", "~", "100", "1234567"] {
            for b in ["", "a", "ab", "~", "100", "1234567", "\0"] {
                assert_eq!(packed(a, 8).cmp(&packed(b, 8)), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn queue_order_is_a_stable_sort_by_request_order() {
        use crate::model::NodeRequest;
        use crate::store::RequestRecord;
        use std::sync::Arc;
        let rec = |id: &str, rp: i64| {
            let mut req = NodeRequest::new(vec![], "r", 0.0);
            req.relative_priority = rp;
            RequestRecord {
                id: id.into(),
                request: Arc::new(req),
                version: 0,
                ephemeral: false,
                ephemeral_owner: 0,
                locked: false,
            }
        };
        let short = [
            rec("200-0000000001", 0),
            rec("100-0000000003", 1),
            rec("100-0000000002", 1),
            rec("100-0000000004", 0),
            rec("x", 0),
            rec("100-0000000002", 1),
            rec("~", -1),
        ];
        let mut long = short.to_vec();
        long.push(rec("100-00000000000000000001", 0));
        long.push(rec("a-long-id-without-a-priority", 0));
        long.push(rec("1000-0000000001", 0));
        // More (priority, relative priority) groups than buckets.
        let many: Vec<RequestRecord> = (0..60)
            .map(|i| rec(&format!("{}-{:010}", 100 + i % 3, 60 - i), i % 20 - 10))
            .collect();
        let mut few = many.clone();
        for r in &mut few {
            Arc::make_mut(&mut r.request).relative_priority %= 3;
        }
        for records in [&short[..], &long[..], &many[..], &few[..]] {
            let mut got: Vec<&RequestRecord> = records.iter().collect();
            sort_queue(&mut got, |r| (r.id.as_str(), r.request.relative_priority));
            let mut want: Vec<&RequestRecord> = records.iter().collect();
            want.sort_by_key(|r| request_order(&r.id, r.request.relative_priority));
            assert!(got.iter().zip(&want).all(|(a, b)| std::ptr::eq(*a, *b)));
            assert_eq!(got.len(), want.len());
        }
    }
}
