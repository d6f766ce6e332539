//! Pure, per-event work spread over the machine's cores: signature checks and hashing depend on
//! nothing a batch changes, so they run side by side before the ordered pass. In the tab (one
//! thread) it runs in place.

/// Below this many items a second thread costs more than it saves (a check is ~40 µs, a
/// thread start ~20 µs).
#[cfg(not(target_arch = "wasm32"))]
const MIN_PER_THREAD: usize = 4;

/// Calls `f` on every item, on up to as many threads as there are cores.
pub fn for_each<T: Send>(items: &mut [T], f: impl Fn(&mut T) + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(items.len() / MIN_PER_THREAD).max(1);
        if threads > 1 {
            let chunk = items.len().div_ceil(threads);
            let f = &f;
            std::thread::scope(|scope| {
                let mut chunks = items.chunks_mut(chunk);
                let first = chunks.next();
                for rest in chunks {
                    scope.spawn(move || rest.iter_mut().for_each(f));
                }
                // This thread takes a share too instead of only waiting.
                if let Some(first) = first {
                    first.iter_mut().for_each(f);
                }
            });
            return;
        }
    }
    items.iter_mut().for_each(f);
}

/// `f` of every item, in order, computed as [`for_each`] does.
pub fn map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    // One thread in the tab: in place, with no slots to fill.
    #[cfg(target_arch = "wasm32")]
    {
        items.into_iter().map(f).collect()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let mut slots: Vec<(Option<T>, Option<R>)> =
            items.into_iter().map(|t| (Some(t), None)).collect();
        for_each(&mut slots, |(item, out)| *out = item.take().map(&f));
        slots
            .into_iter()
            .map(|(_, out)| out.expect("every slot is mapped"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_item_is_visited_once() {
        for n in [0, 1, 3, 7, 8, 9, 100, 101] {
            let mut items: Vec<(usize, u32)> = (0..n).map(|i| (i, 0)).collect();
            super::for_each(&mut items, |(_, seen)| *seen += 1);
            assert!(items.iter().all(|(_, seen)| *seen == 1), "n = {n}");
            assert!(items.iter().enumerate().all(|(i, (j, _))| i == *j));
        }
    }

    #[test]
    fn map_keeps_the_order() {
        let items: Vec<u64> = (0..1000).collect();
        let out = super::map(items, |x| x * 2);
        assert_eq!(out, (0..1000).map(|x| x * 2).collect::<Vec<_>>());
    }
}
