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

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_item_order_on_any_number_of_threads() {
        let items: Vec<u32> = (0..1000).collect();
        for threads in [1, 2, 3, 4, 7] {
            let out = super::map(&items, threads, |x| x * 2);
            assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        }
        assert_eq!(super::threads_for(3), 1);
        assert!(super::threads_for(10_000) >= 1);
    }
}
