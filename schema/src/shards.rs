//! Shards: which scheduler decides for which challenge.
//!
//! A challenge belongs to one of a fixed number of shards, by a stable hash
//! of its name ([`shard_of`]); every scheduling write for its instances is
//! made, and fenced, by that shard's leader. Which live controller should
//! lead each shard is [`assign`]: every controller computes it from the
//! same view (the live controllers and the current leaders in etcd), so
//! they agree without talking to each other.

use std::collections::BTreeMap;

/// The most shards a cluster may be configured with.
pub const MAX_SHARDS: u16 = 1024;

/// The shard of the challenge `name` among `shards` (FNV-1a of the name:
/// the same on every machine and in every release).
pub fn shard_of(name: &str, shards: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u16
}

/// Who should lead each of `shards` shards, given the `live` controllers
/// and who `leads` some shards now.
///
/// - Balanced: each live controller is given ⌊shards / n⌋ or ⌈shards / n⌉
///   shards.
/// - Sticky: a shard stays with its live leader while that leader is
///   within its share, so a controller leaving moves only its own shards
///   and a controller joining takes shards only from those above their
///   share.
/// - Deterministic: the same input gives the same answer on every
///   controller.
///
/// Empty when no controller is live.
pub fn assign(
    shards: u16,
    live: &[String],
    leads: &BTreeMap<u16, String>,
) -> BTreeMap<u16, String> {
    let mut ids: Vec<&String> = live.iter().collect();
    ids.sort();
    ids.dedup();
    let mut out = BTreeMap::new();
    if ids.is_empty() {
        return out;
    }
    let n = ids.len();
    let held = |id: &str| leads.values().filter(|l| l.as_str() == id).count();
    // Those holding the most get the larger shares: the fewest moves.
    let mut by_held = ids.clone();
    by_held.sort_by(|a, b| held(b).cmp(&held(a)).then_with(|| a.cmp(b)));
    let (base, extra) = (usize::from(shards) / n, usize::from(shards) % n);
    let mut room: BTreeMap<&str, usize> = by_held
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), base + usize::from(i < extra)))
        .collect();
    // Keep: shards whose leader is live and within its share, lowest first.
    for (&shard, leader) in leads.range(..shards) {
        if let Some(r) = room.get_mut(leader.as_str())
            && *r > 0
        {
            *r -= 1;
            out.insert(shard, leader.clone());
        }
    }
    // The rest go, lowest shard first, to the controller with the most
    // room left (ties: the lowest id), so the answer does not depend on
    // the order the leaders were seen in.
    for shard in 0..shards {
        if out.contains_key(&shard) {
            continue;
        }
        let Some((&id, _)) = room
            .iter()
            .filter(|(_, r)| **r > 0)
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        else {
            break;
        };
        if let Some(r) = room.get_mut(id) {
            *r -= 1;
        }
        out.insert(shard, id.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn counts(a: &BTreeMap<u16, String>) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for id in a.values() {
            *c.entry(id.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn the_hash_is_stable_and_spreads() {
        // Pinned: a change here moves every challenge of a running event.
        assert_eq!(shard_of("web", 16), 1);
        assert_eq!(shard_of("pwn-heap", 16), 7);
        assert_eq!(shard_of("crypto-1", 1024), 354);
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_of("x", 0), 0, "no division by zero");
        let mut hit = [0u32; 16];
        for i in 0..1600 {
            hit[usize::from(shard_of(&format!("chall-{i}"), 16))] += 1;
        }
        assert!(hit.iter().all(|&h| h > 50), "{hit:?}");
    }

    #[test]
    fn three_controllers_share_sixteen_shards_six_five_five() {
        let a = assign(16, &ids(&["c1", "c2", "c3"]), &BTreeMap::new());
        assert_eq!(a.len(), 16);
        let mut c: Vec<usize> = counts(&a).into_values().collect();
        c.sort();
        assert_eq!(c, vec![5, 5, 6]);
    }

    #[test]
    fn a_controller_leaving_moves_only_its_shards_and_coming_back_takes_some_back() {
        let three = ids(&["c1", "c2", "c3"]);
        let a = assign(16, &three, &BTreeMap::new());
        // c3 dies: its shards have no live leader any more.
        let left: BTreeMap<u16, String> = a
            .iter()
            .filter(|(_, l)| *l != "c3")
            .map(|(s, l)| (*s, l.clone()))
            .collect();
        let b = assign(16, &ids(&["c1", "c2"]), &left);
        for (s, l) in &left {
            assert_eq!(&b[s], l, "shard {s} moved between survivors");
        }
        assert_eq!(counts(&b).into_values().collect::<Vec<_>>(), vec![8, 8]);
        // c3 comes back: it gets 5 or 6, the others lose only what is above their share.
        let c = assign(16, &three, &b);
        let moved = c.iter().filter(|(s, l)| b[s] != **l).count();
        assert_eq!(counts(&c).get("c3").copied().unwrap_or(0), moved);
        assert!((5..=6).contains(&moved), "{c:?}");
    }

    proptest! {
        #[test]
        fn balanced_sticky_and_a_fixed_point(
            shards in 1u16..64,
            n in 1usize..8,
            leads in proptest::collection::btree_map(0u16..80, 0usize..10, 0..80),
        ) {
            let live: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            let leads: BTreeMap<u16, String> =
                leads.into_iter().map(|(s, i)| (s, format!("c{i}"))).collect();
            let a = assign(shards, &live, &leads);
            // Every shard, each to a live controller, shares within one.
            prop_assert_eq!(a.len(), usize::from(shards));
            prop_assert!(a.values().all(|l| live.contains(l)));
            let c = counts(&a);
            let (lo, hi) = (usize::from(shards) / n, usize::from(shards).div_ceil(n));
            for id in &live {
                let k = c.get(id).copied().unwrap_or(0);
                prop_assert!(k == lo || k == hi, "{} has {}", id, k);
            }
            // Once everyone took its shards, nothing moves again.
            prop_assert_eq!(assign(shards, &live, &a), a);
        }
    }
}
