//! Spreading file-system work over a few threads. Creating and reading many small files is
//! mostly kernel time, and it overlaps well on several cores, even within one directory.

/// Below this many items, one thread does the work (spawning would cost more than it saves).
const PARALLEL_MIN_ITEMS: usize = 64;
const MAX_THREADS: usize = 4;

/// How many threads to use for `items` pieces of file work.
pub fn threads_for(items: usize) -> usize {
    if items < PARALLEL_MIN_ITEMS {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_THREADS)
}

/// Runs `f` on every item, on up to `threads` threads; results come back in item order.
pub fn map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if threads <= 1 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        // A worker can only panic on a bug; the panic is carried on, not swallowed.
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// [`map`], with the items of one group (`group(item)`, e.g. a parent directory) all on the
/// same thread: work that takes a per-group lock (entries added to one directory) would only
/// spin on it side by side. Groups go to threads largest first, each to the least loaded one.
pub fn map_grouped<T: Sync, R: Send, K: Ord>(
    items: &[T],
    threads: usize,
    group: impl Fn(&T) -> K,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let mut groups: std::collections::BTreeMap<K, Vec<usize>> = Default::default();
    for (i, item) in items.iter().enumerate() {
        groups.entry(group(item)).or_default().push(i);
    }
    let threads = threads.min(groups.len()).max(1);
    if threads == 1 || items.len() < 2 {
        return items.iter().map(f).collect();
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
    let mut lanes: Vec<Vec<usize>> = vec![Vec::new(); threads];
    for g in groups {
        if let Some(lane) = lanes.iter_mut().min_by_key(|l| l.len()) {
            lane.extend(g);
        }
    }
    let done: Vec<Vec<(usize, R)>> = map(&lanes, threads, |lane| {
        lane.iter().map(|&i| (i, f(&items[i]))).collect()
    });
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in done.into_iter().flatten() {
        out[i] = Some(r);
    }
    // Every index is in exactly one lane.
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_item_order_on_any_number_of_threads() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 3, 4, 7] {
            let out = super::map(&items, threads, |x| x * 2);
            assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
        for threads in [1, 2, 3, 4] {
            let out = super::map_grouped(&items, threads, |x| x % 7, |x| x * 3);
            assert_eq!(out, items.iter().map(|x| x * 3).collect::<Vec<_>>());
        }
        // One group: one thread, whatever was asked.
        let seen = std::sync::Mutex::new(std::collections::HashSet::new());
        super::map_grouped(
            &items,
            4,
            |_| 0,
            |_| {
                if let Ok(mut s) = seen.lock() {
                    s.insert(std::thread::current().id());
                }
            },
        );
        assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 1);
        assert_eq!(super::threads_for(3), 1);
        assert!(super::threads_for(10_000) >= 1);
    }
}
