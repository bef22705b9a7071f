//! Rendezvous (highest random weight) hashing: every launcher computes the
//! same owner for a label from the same set of registered pools, without
//! talking to the others, so exactly one creates min-ready requests.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a from state `h` over `bytes`: the hash of a concatenation can be
/// continued from the state after its prefix.
fn fnv1a_from(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn avalanche(mut h: u64) -> u64 {
    // FNV's low bits mix poorly for similar keys; finish with a murmur-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// 64-bit FNV-1a: stable across processes, versions and platforms (unlike
/// `std`'s hasher), which matters because several processes must agree.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    avalanche(fnv1a_from(FNV_OFFSET, bytes))
}

/// The candidate with the highest score for `key`; ties go to the smaller
/// candidate so the choice is total.
///
/// ```no_run
/// use nodepool_core::planner::rendezvous_owner;
///
/// // Every launcher computes the same owner from the same pool ids.
/// let pools = ["host1-PoolWorker.p1-main-1", "host2-PoolWorker.p2-main-2"];
/// let owner = rendezvous_owner("ubuntu-jammy", pools.iter().copied());
/// assert!(owner.is_some());
/// ```
pub fn rendezvous_owner<'c>(
    key: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    // The score is the hash of `key \0 candidate`: hash the shared prefix once.
    let prefix = fnv1a_from(fnv1a_from(FNV_OFFSET, key.as_bytes()), &[0]);
    candidates
        .into_iter()
        .map(|c| (avalanche(fnv1a_from(prefix, c.as_bytes())), c))
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

    #[test]
    fn owner_is_the_highest_hash_of_key_and_candidate() {
        // Launchers of different versions must agree: the score stays the
        // hash of `key \0 candidate`, however it is computed.
        let pools = ["p1", "p2", "p3", "a-much-longer-pool-id-0"];
        for key in ["", "ubuntu", "100-0000000042"] {
            let best = pools
                .iter()
                .copied()
                .max_by_key(|c| fnv1a(format!("{key}\0{c}").as_bytes()));
            assert_eq!(rendezvous_owner(key, pools), best);
        }
        assert_eq!(fnv1a(b""), avalanche(FNV_OFFSET));
    }
}
