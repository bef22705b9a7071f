//! Rendezvous (highest random weight) hashing: every launcher computes the
//! same owner for a label from the same set of registered pools, without
//! talking to the others, so exactly one creates min-ready requests.

/// 64-bit FNV-1a: stable across processes, versions and platforms (unlike
/// `std`'s hasher), which matters because several processes must agree.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits mix poorly for similar keys; finish with a murmur-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The candidate with the highest score for `key`; ties go to the smaller
/// candidate so the choice is total.
pub fn rendezvous_owner<'c>(
    key: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| {
            let mut buf = Vec::with_capacity(key.len() + c.len() + 1);
            buf.extend_from_slice(key.as_bytes());
            buf.push(0);
            buf.extend_from_slice(c.as_bytes());
            (fnv1a(&buf), c)
        })
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_stable_and_spread() {
        let pools = [
            "a-PoolWorker.p1-main-1",
            "b-PoolWorker.p2-main-2",
            "c-PoolWorker.p3-main-3",
        ];
        let owner = rendezvous_owner("ubuntu", pools);
        assert_eq!(
            owner,
            rendezvous_owner("ubuntu", pools.iter().rev().copied())
        );
        // Removing a non-owner does not move the label.
        let rest: Vec<&str> = pools
            .iter()
            .copied()
            .filter(|p| Some(*p) != owner)
            .collect();
        let without_other: Vec<&str> = pools.iter().copied().filter(|p| *p != rest[0]).collect();
        assert_eq!(rendezvous_owner("ubuntu", without_other), owner);
        // 100 labels over 3 pools: every pool owns some.
        let mut counts = [0; 3];
        for i in 0..100 {
            let o = rendezvous_owner(&format!("label-{i}"), pools).expect("owner");
            counts[pools.iter().position(|p| *p == o).expect("known")] += 1;
        }
        assert!(counts.iter().all(|&c| c > 15), "{counts:?}");
        assert_eq!(rendezvous_owner("x", []), None);
    }
}
