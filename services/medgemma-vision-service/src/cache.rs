//! The embedding cache: projected embeddings (as returned, in the response dtype) keyed by the
//! image's SHA-256 and the decode option that changes the result (the DICOM frame), least
//! recently used evicted first under a byte bound.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// What identifies an embedding: the image bytes' SHA-256 and the frame decoded from them.
/// The other decode options (size and pixel limits) are the service's own and never change a
/// result that succeeded; the dtype is the service's too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    pub sha256: [u8; 32],
    pub frame: u32,
}

/// One image's embedding, ready for the response.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// Raw little-endian values.
    pub data: Vec<u8>,
    /// `[tokens_per_image, hidden_size]`.
    pub shape: Vec<u32>,
}

/// Book-keeping bytes counted per entry beside the values (key, shape, map and order slots).
const ENTRY_OVERHEAD: usize = 128;

fn entry_bytes(e: &Encoded) -> usize {
    e.data.len() + 4 * e.shape.len() + ENTRY_OVERHEAD
}

/// A byte-bounded LRU map; capacity 0 holds nothing (the cache is off).
#[derive(Debug)]
pub(crate) struct EmbeddingCache {
    capacity: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<CacheKey, (Arc<Encoded>, u64)>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, CacheKey>,
}

impl EmbeddingCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes held (values plus book-keeping).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The embedding of `key`, now the most recently used.
    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<Encoded>> {
        let tick = self.next_tick();
        let (value, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, *key);
        Some(Arc::clone(value))
    }

    /// Whether `key` is held (no change to the order).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Keeps `value` under `key`, evicting the least recently used entries until it fits; an
    /// entry larger than the whole cache is not kept.
    pub fn insert(&mut self, key: CacheKey, value: Arc<Encoded>) {
        let size = entry_bytes(&value);
        if size > self.capacity {
            return;
        }
        if let Some((old, used)) = self.entries.remove(&key) {
            self.order.remove(&used);
            self.bytes -= entry_bytes(&old);
        }
        while self.bytes + size > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((old, _)) = self.entries.remove(&oldest) {
                self.bytes -= entry_bytes(&old);
            }
        }
        let tick = self.next_tick();
        self.order.insert(tick, key);
        self.entries.insert(key, (value, tick));
        self.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, frame: u32) -> CacheKey {
        CacheKey {
            sha256: [n; 32],
            frame,
        }
    }

    fn value(len: usize, fill: u8) -> Arc<Encoded> {
        Arc::new(Encoded {
            data: vec![fill; len],
            shape: vec![1, len as u32],
        })
    }

    #[test]
    fn least_recently_used_goes_first_and_bytes_stay_bounded() {
        let one = entry_bytes(&value(1000, 0));
        let mut c = EmbeddingCache::new(3 * one);
        c.insert(key(1, 0), value(1000, 1));
        c.insert(key(2, 0), value(1000, 2));
        c.insert(key(3, 0), value(1000, 3));
        assert_eq!((c.len(), c.bytes()), (3, 3 * one));
        // Touch 1: 2 is now the oldest and makes room for 4.
        assert_eq!(c.get(&key(1, 0)).unwrap().data[0], 1);
        c.insert(key(4, 0), value(1000, 4));
        assert!(c.get(&key(2, 0)).is_none());
        for k in [1, 3, 4] {
            assert_eq!(c.get(&key(k, 0)).unwrap().data[0], k);
        }
        assert!(c.bytes() <= c.capacity);
        // A bigger entry evicts as many as it needs.
        c.insert(key(5, 0), value(2500, 5));
        assert_eq!(c.len(), 1);
        assert!(c.contains(&key(5, 0)) && c.bytes() <= c.capacity);
    }

    #[test]
    fn the_frame_is_part_of_the_key() {
        let mut c = EmbeddingCache::new(1 << 20);
        c.insert(key(1, 0), value(10, 7));
        assert!(c.get(&key(1, 1)).is_none());
        assert!(c.get(&key(1, 0)).is_some());
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count_right() {
        let mut c = EmbeddingCache::new(1 << 20);
        c.insert(key(1, 0), value(100, 1));
        c.insert(key(1, 0), value(300, 2));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), entry_bytes(&value(300, 0)));
        assert_eq!(c.get(&key(1, 0)).unwrap().data[0], 2);
    }

    #[test]
    fn capacity_zero_is_off_and_oversized_entries_are_not_kept() {
        let mut c = EmbeddingCache::new(0);
        assert!(!c.enabled());
        c.insert(key(1, 0), value(1, 1));
        assert_eq!((c.len(), c.bytes()), (0, 0));
        let mut c = EmbeddingCache::new(500);
        c.insert(key(1, 0), value(10, 1));
        c.insert(key(2, 0), value(1000, 2));
        assert!(c.contains(&key(1, 0)) && !c.contains(&key(2, 0)));
    }
}
