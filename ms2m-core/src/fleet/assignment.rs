//! Where each task belongs: a pure function of the tasks, the live hosts
//! and where the tasks are now, so every host that folds the same records
//! computes the same answer, and a recomputation with nothing changed moves
//! nothing.
//!
//! * **Sticky**: a task stays where it is unless its host is gone (dead or
//!   drained) or holds more than its share.
//! * **Even by count**: with `n` tasks over `h` hosts, `n % h` hosts hold
//!   `⌈n/h⌉` and the others `⌊n/h⌋`; the hosts that hold the most now keep
//!   the larger shares (fewest moves).
//! * **Deterministic**: ties break by host id, tasks in id order.
//!
//! Without balancing (`balance = false`, a fleet whose operator rebalances
//! by hand), only tasks without a live host move, each to the host holding
//! the fewest.

use std::collections::BTreeMap;

/// The host of each task: `current` kept where the rules allow, the rest
/// spread over `hosts` (sorted, deduplicated, non-empty; an empty `hosts`
/// assigns nothing).
pub fn assign(
    tasks: &[String],
    hosts: &[String],
    current: &BTreeMap<String, String>,
    balance: bool,
) -> BTreeMap<String, String> {
    if hosts.is_empty() {
        return BTreeMap::new();
    }
    let quota = quotas(tasks, hosts, current, balance);
    let mut load: BTreeMap<&str, usize> = hosts.iter().map(|h| (h.as_str(), 0)).collect();
    let mut out = BTreeMap::new();
    let mut free = Vec::new();
    for task in tasks {
        match current.get(task).filter(|h| load.contains_key(h.as_str())) {
            Some(host) if load[host.as_str()] < quota[host.as_str()] => {
                *load.get_mut(host.as_str()).expect("a live host") += 1;
                out.insert(task.clone(), host.clone());
            }
            _ => free.push(task),
        }
    }
    for task in free {
        let host = least_loaded(&load);
        *load.get_mut(host).expect("a live host") += 1;
        out.insert(task.clone(), host.to_string());
    }
    out
}

/// How many tasks each host may keep: the even shares (the larger ones to
/// the hosts holding the most now), or, without balancing, no limit.
fn quotas<'a>(
    tasks: &[String],
    hosts: &'a [String],
    current: &BTreeMap<String, String>,
    balance: bool,
) -> BTreeMap<&'a str, usize> {
    if !balance {
        return hosts.iter().map(|h| (h.as_str(), usize::MAX)).collect();
    }
    let held = |h: &str| tasks.iter().filter(|t| current.get(*t).is_some_and(|c| c == h)).count();
    let mut by_held: Vec<&str> = hosts.iter().map(String::as_str).collect();
    // Most held first; ties by id (the sort is stable over sorted hosts).
    by_held.sort_by_key(|h| std::cmp::Reverse(held(h)));
    let (base, extra) = (tasks.len() / hosts.len(), tasks.len() % hosts.len());
    by_held
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, base + usize::from(i < extra)))
        .collect()
}

/// The host holding the fewest tasks (the first by id among equals).
fn least_loaded<'a>(load: &BTreeMap<&'a str, usize>) -> &'a str {
    load.iter()
        .min_by_key(|(host, n)| (**n, **host))
        .map(|(host, _)| *host)
        .expect("hosts is not empty")
}

/// The tasks whose host differs between `from` and `to`.
pub fn moves<'a>(from: &BTreeMap<String, String>, to: &'a BTreeMap<String, String>) -> Vec<(&'a str, &'a str)> {
    to.iter()
        .filter(|(task, host)| from.get(*task) != Some(*host))
        .map(|(task, host)| (task.as_str(), host.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(n: usize) -> Vec<String> {
        (0..n).map(|p| format!("t/p{p:02}")).collect()
    }

    fn hosts(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|h| h.to_string()).collect()
    }

    fn counts(a: &BTreeMap<String, String>) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for h in a.values() {
            *c.entry(h.as_str()).or_default() += 1;
        }
        c
    }

    #[test]
    fn scaling_out_moves_only_the_new_hosts_shares() {
        let t = tasks(16);
        let one = assign(&t, &hosts(&["a"]), &BTreeMap::new(), true);
        assert_eq!(counts(&one), BTreeMap::from([("a", 16)]));
        let four = assign(&t, &hosts(&["a", "b", "c", "d"]), &one, true);
        assert_eq!(counts(&four), BTreeMap::from([("a", 4), ("b", 4), ("c", 4), ("d", 4)]));
        assert_eq!(moves(&one, &four).len(), 12, "only the tasks the new hosts take move");
        assert!(moves(&four, &assign(&t, &hosts(&["a", "b", "c", "d"]), &four, true)).is_empty());
    }

    #[test]
    fn draining_moves_only_the_drained_hosts_tasks() {
        let t = tasks(16);
        let four = assign(&t, &hosts(&["a", "b", "c", "d"]), &BTreeMap::new(), true);
        let two = assign(&t, &hosts(&["a", "b"]), &four, true);
        assert_eq!(counts(&two), BTreeMap::from([("a", 8), ("b", 8)]));
        for (task, host) in &two {
            if matches!(four[task].as_str(), "a" | "b") {
                assert_eq!(&four[task], host, "{task} stayed where it was");
            }
        }
    }

    #[test]
    fn uneven_counts_give_the_larger_shares_to_the_hosts_holding_most() {
        let t = tasks(10);
        let current: BTreeMap<String, String> = t
            .iter()
            .enumerate()
            .map(|(i, task)| (task.clone(), ["a", "b", "c"][i.min(9) % 3].to_string()))
            .collect();
        let four = assign(&t, &hosts(&["a", "b", "c", "d"]), &current, true);
        let c = counts(&four);
        assert_eq!((c["a"], c["b"], c["c"], c["d"]), (3, 3, 2, 2));
    }

    #[test]
    fn without_balancing_only_orphans_move() {
        let t = tasks(8);
        let current: BTreeMap<String, String> = t.iter().map(|task| (task.clone(), "a".to_string())).collect();
        let joined = assign(&t, &hosts(&["a", "b"]), &current, false);
        assert!(moves(&current, &joined).is_empty(), "a new host waits for a rebalance");
        let failed = assign(&t, &hosts(&["b", "c"]), &current, false);
        assert_eq!(counts(&failed), BTreeMap::from([("b", 4), ("c", 4)]));
    }

    #[test]
    fn no_hosts_assign_nothing() {
        assert!(assign(&tasks(4), &[], &BTreeMap::new(), true).is_empty());
    }
}
