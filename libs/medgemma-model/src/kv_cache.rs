//! A paged KV cache: fixed-size blocks of rows, a block table per sequence.
//!
//! Sliding-window layers and global layers keep separate block tables, because they keep
//! different rows: a sliding layer frees every block that no future query can see (so its
//! memory is bounded by the window), a global layer grows with the sequence. Nothing is
//! preallocated for the model's maximum context: blocks are made when first needed and
//! recycled through a free list.
//!
//! Prefix caching (when switched on): every full block is keyed by a chained hash of the token
//! ids up to its end (salted, for a sequence with images, by a hash of its image embeddings),
//! as vLLM's automatic prefix caching keys its blocks. A finished sequence's hashed blocks stay
//! cached; a new sequence whose prompt starts with the same blocks attaches them read-only
//! (reference-counted) and skips their prefill. Cached blocks no sequence uses are evicted,
//! least recently used first, when blocks run out.

use std::collections::{BTreeMap, HashMap, VecDeque};

use sha2::{Digest, Sha256};

use candle_core::{DType, Device, Tensor};

use crate::config::{LayerType, TextConfig};
use crate::error::{ModelError, Result};

/// Without a byte limit, the most bytes of cached prefix blocks that no sequence holds.
pub const UNBOUNDED_PREFIX_CACHE_BYTES: usize = 1 << 30;

/// Rows per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Sizing of a [`KvCache`].
#[derive(Debug, Clone, Copy)]
pub struct KvCacheConfig {
    /// Rows (positions) per block.
    pub block_size: usize,
    /// Upper bound on bytes held by blocks in use; `None` means unbounded.
    pub max_bytes: Option<usize>,
    /// Blocks of the sliding-layer and the global-layer pools of the paged layout (one
    /// `[blocks, block_size, kv_heads, head_dim]` tensor per layer for k and for v, what the
    /// GPU attention kernel reads). `None`: per-block tensors made on demand on the CPU; on
    /// CUDA, pools sized from `max_bytes` (default [`DEFAULT_PAGED_KV_BYTES`]).
    pub paged_blocks: Option<[usize; 2]>,
}

/// The KV bytes of a paged cache on CUDA that was given no byte limit (`medgemma generate`,
/// tests); the services size theirs with `--gpu-memory-utilization`.
pub const DEFAULT_PAGED_KV_BYTES: usize = 1 << 30;

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            max_bytes: None,
            paged_blocks: None,
        }
    }
}

/// One group of layers that share block tables (all sliding layers, or all global layers).
#[derive(Debug)]
struct BlockStore {
    /// Model layer index -> index within this store.
    layers: Vec<usize>,
    /// Per block id: per layer of this kind, (k, v) each `[kv_heads, block_size, head_dim]`.
    blocks: Vec<Vec<(Tensor, Tensor)>>,
    /// Per block id: sequences holding it, its prefix hash when cached, its LRU tick.
    meta: Vec<BlockMeta>,
    free: Vec<usize>,
    in_use: usize,
    /// Prefix hash -> block id, for every cached block.
    cached: HashMap<u128, usize>,
    /// Cached blocks no sequence holds, oldest release first: tick -> block id.
    lru: BTreeMap<u64, usize>,
}

impl BlockStore {
    fn new() -> Self {
        Self {
            layers: Vec::new(),
            blocks: Vec::new(),
            meta: Vec::new(),
            free: Vec::new(),
            in_use: 0,
            cached: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    /// One more holder of block `id`.
    fn hold(&mut self, id: usize) {
        let m = &mut self.meta[id];
        if m.refs == 0 {
            self.in_use += 1;
            self.lru.remove(&m.tick);
        }
        m.refs += 1;
    }

    /// One holder fewer; an unheld block goes to the LRU list when cached, else to the free
    /// list.
    fn unhold(&mut self, id: usize, tick: &mut u64) {
        let m = &mut self.meta[id];
        m.refs -= 1;
        if m.refs > 0 {
            return;
        }
        self.in_use -= 1;
        if m.hash.is_some() {
            *tick += 1;
            m.tick = *tick;
            self.lru.insert(m.tick, id);
        } else {
            self.free.push(id);
        }
    }

    /// Takes the least recently used cached block out of the cache (unheld, unhashed).
    fn evict(&mut self) -> Option<usize> {
        let (_, id) = self.lru.pop_first()?;
        if let Some(h) = self.meta[id].hash.take() {
            self.cached.remove(&h);
        }
        Some(id)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct BlockMeta {
    refs: u32,
    hash: Option<u128>,
    tick: u64,
}

/// One sequence's cached rows of one layer on the CPU, in place: per block its k and v
/// (`[kv_heads, block_size, head_dim]` f32) and how many of its rows count.
#[derive(Debug)]
pub struct CpuRows<'a> {
    pub blocks: Vec<(&'a [f32], &'a [f32], usize)>,
    pub block_size: usize,
    pub head_dim: usize,
}

impl CpuRows<'_> {
    /// Row `r` of block `b`'s keys and values for kv head `g`.
    pub fn row(&self, b: usize, g: usize, r: usize) -> (&[f32], &[f32]) {
        let (k, v, _) = self.blocks[b];
        let at = (g * self.block_size + r) * self.head_dim;
        (&k[at..at + self.head_dim], &v[at..at + self.head_dim])
    }
}

/// A block of one sequence's table: the block id and the position of its first row.
#[derive(Debug, Clone, Copy)]
struct BlockRef {
    id: usize,
    start: usize,
}

/// Per-sequence cache state: how many positions are cached, and the block tables.
#[derive(Debug, Default)]
pub struct SequenceKv {
    len: usize,
    /// Index 0: sliding layers, 1: global layers.
    tables: [VecDeque<BlockRef>; 2],
    released: bool,
    /// Prefix hashing: the salt (0: none), the hash of the last full block, and the tokens of
    /// the block being filled.
    salt: u128,
    last_hash: u128,
    partial: Vec<u32>,
}

impl SequenceKv {
    /// Number of positions already in the cache (= position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held by this sequence (both kinds).
    pub fn blocks(&self) -> usize {
        self.tables[0].len() + self.tables[1].len()
    }
}

/// The KV cache of one model: all block storage, shared by every sequence.
#[derive(Debug)]
pub struct KvCache {
    cfg: KvCacheConfig,
    device: Device,
    dtype: DType,
    kv_heads: usize,
    head_dim: usize,
    window: usize,
    /// Model layer index -> (store index, index within store).
    layer_slot: Vec<(usize, usize)>,
    stores: [BlockStore; 2],
    prefix_caching: bool,
    tick: u64,
    /// The paged layout's pools, when the cache is paged.
    pool: Option<Pool>,
}

/// The paged layout: per model layer one k and one v tensor `[blocks of its kind, block_size,
/// kv_heads, head_dim]`, made at the first reservation; block ids index their first dim.
#[derive(Debug)]
struct Pool {
    blocks: [usize; 2],
    tensors: Vec<(Tensor, Tensor)>,
}

/// The chained hash of one block: the previous block's hash, the salt and the block's tokens.
fn block_hash(prev: u128, salt: u128, tokens: &[u32]) -> u128 {
    let mut h = Sha256::new();
    h.update(prev.to_le_bytes());
    h.update(salt.to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    u128::from_le_bytes(d[..16].try_into().expect("32-byte digest"))
}

/// The pools of a paged cache that was given no capacities: `max_bytes` (or
/// [`DEFAULT_PAGED_KV_BYTES`]) split as the memory planning splits it, for the scheduler's
/// default batch (64 sequences, 512-row steps).
fn default_paged_blocks(text: &TextConfig, dtype: DType, cfg: KvCacheConfig) -> [usize; 2] {
    let bytes = cfg.max_bytes.unwrap_or(DEFAULT_PAGED_KV_BYTES);
    let input = crate::memory::PlanInput::for_model(
        text,
        0,
        0,
        0,
        1.0,
        dtype.size_in_bytes(),
        cfg.block_size.max(1),
        64,
        512,
    );
    crate::memory::split_blocks(bytes, &input)
}

fn kind_index(t: LayerType) -> usize {
    match t {
        LayerType::Sliding => 0,
        LayerType::Global => 1,
    }
}

impl KvCache {
    /// An empty cache for a model; no memory is allocated until sequences need it.
    pub fn new(text: &TextConfig, dtype: DType, device: &Device, cfg: KvCacheConfig) -> Self {
        let mut stores = [BlockStore::new(), BlockStore::new()];
        let mut layer_slot = Vec::with_capacity(text.num_hidden_layers);
        for i in 0..text.num_hidden_layers {
            let s = kind_index(text.layer_type(i));
            layer_slot.push((s, stores[s].layers.len()));
            stores[s].layers.push(i);
        }
        let block_size = cfg.block_size.max(1);
        let pool = cfg
            .paged_blocks
            .or_else(|| {
                device
                    .is_cuda()
                    .then(|| default_paged_blocks(text, dtype, cfg))
            })
            .map(|blocks| Pool {
                blocks,
                tensors: Vec::new(),
            });
        Self {
            cfg: KvCacheConfig { block_size, ..cfg },
            device: device.clone(),
            dtype,
            kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            window: text.sliding_window,
            layer_slot,
            stores,
            prefix_caching: false,
            tick: 0,
            pool,
        }
    }

    /// Whether the cache has the paged layout (per-layer pools read by the paged attention).
    pub fn is_paged(&self) -> bool {
        self.pool.is_some()
    }

    /// Pool capacities in blocks (sliding, global) of a paged cache.
    pub fn paged_blocks(&self) -> Option<[usize; 2]> {
        self.pool.as_ref().map(|p| p.blocks)
    }

    /// The k and v pools of model layer `layer` of a paged cache (after the first reservation).
    pub(crate) fn pool(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.pool.as_ref().and_then(|p| p.tensors.get(layer))
    }

    /// A sequence's block table for layers of `kind`: the position of its first block and the
    /// block ids in order.
    pub(crate) fn table(&self, seq: &SequenceKv, kind: LayerType) -> (usize, Vec<u32>) {
        let t = &seq.tables[kind_index(kind)];
        let first = t.front().map_or(seq.len, |b| b.start);
        (first, t.iter().map(|b| b.id as u32).collect())
    }

    /// Makes the pools of a paged cache, once.
    fn ensure_pool(&mut self) -> Result<()> {
        let (kv_heads, bs, hd, dtype) = (
            self.kv_heads,
            self.cfg.block_size,
            self.head_dim,
            self.dtype,
        );
        let Some(pool) = self.pool.as_mut() else {
            return Ok(());
        };
        if !pool.tensors.is_empty() {
            return Ok(());
        }
        let mut tensors = Vec::with_capacity(self.layer_slot.len());
        for &(s, _) in &self.layer_slot {
            let shape = (pool.blocks[s].max(1), bs, kv_heads, hd);
            tensors.push((
                Tensor::zeros(shape, dtype, &self.device)?,
                Tensor::zeros(shape, dtype, &self.device)?,
            ));
        }
        pool.tensors = tensors;
        Ok(())
    }

    /// A block of store `s` from the paged pools: a free id, a new id below the capacity, or
    /// the least recently used cached block.
    fn alloc_pooled(&mut self, s: usize, cap: usize) -> Result<usize> {
        self.ensure_pool()?;
        let st = &mut self.stores[s];
        let id = match st.free.pop() {
            Some(id) => id,
            None if st.blocks.len() < cap => {
                st.blocks.push(Vec::new());
                st.meta.push(BlockMeta::default());
                st.blocks.len() - 1
            }
            None => st.evict().ok_or_else(|| {
                ModelError::Limit(format!(
                    "KV cache is full: all {cap} blocks of the {} layers' pool are in use",
                    ["sliding", "global"][s]
                ))
            })?,
        };
        st.hold(id);
        Ok(id)
    }

    /// Writes the new rows of a paged step (`[kv_heads, total, head_dim]` keys and values of
    /// every packed row) into model layer `layer`'s pools, one launch each.
    pub(crate) fn write_paged(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        b: &crate::paged::PagedBatch,
    ) -> Result<()> {
        let (kp, vp) = self
            .pool(layer)
            .ok_or_else(|| ModelError::InvalidInput("paged write before reserve".into()))?;
        crate::paged::write_rows(kp, k, b)?;
        crate::paged::write_rows(vp, v, b)
    }

    /// Switches prefix caching on or off (off by default).
    pub fn set_prefix_caching(&mut self, on: bool) {
        self.prefix_caching = on;
    }

    /// Whether prefix caching is on.
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// A new, empty sequence whose block hashes are salted (by its images; 0: no salt).
    pub fn new_salted_sequence(&self, salt: u128) -> SequenceKv {
        SequenceKv {
            salt,
            ..SequenceKv::default()
        }
    }

    /// The chained hashes of the full blocks of `tokens` (what [`KvCache::attach_prefix`]
    /// looks up).
    pub fn prefix_hashes(&self, tokens: &[u32], salt: u128) -> Vec<u128> {
        let mut prev = 0;
        tokens
            .chunks_exact(self.cfg.block_size)
            .map(|b| {
                prev = block_hash(prev, salt, b);
                prev
            })
            .collect()
    }

    /// Attaches the longest cached prefix of `hashes` (a fresh sequence's prompt blocks) to
    /// `seq`, read-only, and returns the positions it covers (0 when prefix caching is off or
    /// nothing matches). Sliding layers need the blocks of the window before the prefix's end.
    pub fn attach_prefix(&mut self, seq: &mut SequenceKv, hashes: &[u128]) -> usize {
        if !self.prefix_caching || seq.len != 0 || seq.blocks() != 0 {
            return 0;
        }
        let bs = self.cfg.block_size;
        let has = |s: usize, j: usize, st: &[BlockStore; 2]| {
            st[s].layers.is_empty() || st[s].cached.contains_key(&hashes[j])
        };
        let mut k = 0;
        while k < hashes.len() && has(1, k, &self.stores) {
            k += 1;
        }
        let first_sliding = |k: usize| ((k * bs + 1).saturating_sub(self.window) / bs).min(k - 1);
        while k > 0 && !(first_sliding(k)..k).all(|j| has(0, j, &self.stores)) {
            k -= 1;
        }
        if k == 0 {
            return 0;
        }
        for (s, from) in [(0, first_sliding(k)), (1, 0)] {
            if self.stores[s].layers.is_empty() {
                continue;
            }
            for (j, h) in hashes.iter().enumerate().take(k).skip(from) {
                let id = self.stores[s].cached[h];
                self.stores[s].hold(id);
                seq.tables[s].push_back(BlockRef { id, start: j * bs });
            }
        }
        seq.len = k * bs;
        seq.last_hash = hashes[k - 1];
        k * bs
    }

    /// Rows per block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// Bytes of one block for one layer (k and v).
    fn layer_block_bytes(&self) -> usize {
        2 * self.kv_heads * self.cfg.block_size * self.head_dim * self.dtype.size_in_bytes()
    }

    fn store_block_bytes(&self, s: usize) -> usize {
        self.layer_block_bytes() * self.stores[s].layers.len()
    }

    /// Bytes held by blocks that sequences are using.
    pub fn bytes_in_use(&self) -> usize {
        (0..2)
            .map(|s| self.stores[s].in_use * self.store_block_bytes(s))
            .sum()
    }

    /// Bytes allocated, including recycled blocks waiting on the free list.
    pub fn bytes_allocated(&self) -> usize {
        (0..2)
            .map(|s| self.stores[s].blocks.len() * self.store_block_bytes(s))
            .sum()
    }

    /// Blocks in use (sliding, global).
    pub fn blocks_in_use(&self) -> (usize, usize) {
        (self.stores[0].in_use, self.stores[1].in_use)
    }

    /// The byte limit, if any.
    pub fn max_bytes(&self) -> Option<usize> {
        self.cfg.max_bytes
    }

    /// Bytes of one block of `block_size` positions across every layer (the unit in which
    /// block counts are reported).
    pub fn full_block_bytes(&self) -> usize {
        self.layer_block_bytes() * self.layer_slot.len()
    }

    /// The block a sequence's next new block of kind `s` starts at.
    fn next_block_start(&self, seq: &SequenceKv, s: usize) -> usize {
        let bs = self.cfg.block_size;
        seq.tables[s]
            .back()
            .map(|b| b.start + bs)
            .unwrap_or(seq.len - seq.len % bs)
    }

    /// Bytes [`KvCache::reserve`] would allocate for `n` more positions of `seq`.
    pub fn bytes_to_reserve(&self, seq: &SequenceKv, n: usize) -> usize {
        let end = seq.len + n;
        (0..2)
            .filter(|&s| !self.stores[s].layers.is_empty())
            .map(|s| {
                let next = self.next_block_start(seq, s);
                end.saturating_sub(next).div_ceil(self.cfg.block_size) * self.store_block_bytes(s)
            })
            .sum()
    }

    /// Whether `n` more positions of `seq` fit under the byte limit now.
    pub fn can_reserve(&self, seq: &SequenceKv, n: usize) -> bool {
        let end = seq.len + n;
        let pools_fit = self.pool.as_ref().is_none_or(|p| {
            (0..2)
                .filter(|&s| !self.stores[s].layers.is_empty())
                .all(|s| {
                    let next = self.next_block_start(seq, s);
                    let need = end.saturating_sub(next).div_ceil(self.cfg.block_size);
                    self.stores[s].in_use + need <= p.blocks[s]
                })
        });
        pools_fit
            && self
                .cfg
                .max_bytes
                .is_none_or(|max| self.bytes_in_use() + self.bytes_to_reserve(seq, n) <= max)
    }

    /// The most bytes a sequence of `positions` holds at once when its positions are computed
    /// in chunks of at most `chunk`: every global-layer block, and the sliding layers' window
    /// plus one chunk (sliding blocks that left the window are freed after each chunk).
    pub fn bytes_for_sequence(&self, positions: usize, chunk: usize) -> usize {
        let bs = self.cfg.block_size;
        let blocks = positions.div_ceil(bs);
        let sliding = blocks.min((self.window + chunk).div_ceil(bs) + 1);
        sliding * self.store_block_bytes(0) + blocks * self.store_block_bytes(1)
    }

    /// Whether a sequence of `positions` computed in chunks of at most `chunk` fits the pools of
    /// a paged cache when it runs alone (always true for the CPU layout).
    pub fn fits_pools(&self, positions: usize, chunk: usize) -> bool {
        let Some(p) = &self.pool else {
            return true;
        };
        let bs = self.cfg.block_size;
        let blocks = positions.div_ceil(bs);
        let sliding = blocks.min((self.window + chunk).div_ceil(bs) + 1);
        (self.stores[0].layers.is_empty() || sliding <= p.blocks[0])
            && (self.stores[1].layers.is_empty() || blocks <= p.blocks[1])
    }

    /// Drops recycled blocks so their memory returns to the allocator.
    pub fn trim(&mut self) {
        for st in &mut self.stores {
            // Blocks on the free list at the end of the vector can be dropped outright; the
            // others are replaced by empty placeholders that are rebuilt on reuse.
            let free: std::collections::HashSet<usize> = st.free.iter().copied().collect();
            while let Some(last) = st.blocks.len().checked_sub(1) {
                if free.contains(&last) {
                    st.blocks.pop();
                    st.meta.pop();
                } else {
                    break;
                }
            }
            let n = st.blocks.len();
            st.free.retain(|&id| id < n);
            for &id in &st.free {
                st.blocks[id].clear();
            }
        }
    }

    /// Position of the first row still cached for layers of `kind` (0 for global layers;
    /// sliding layers drop blocks that left the window).
    pub fn first_position(&self, seq: &SequenceKv, kind: LayerType) -> usize {
        seq.tables[kind_index(kind)]
            .front()
            .map(|b| b.start)
            .unwrap_or(seq.len)
    }

    /// A new, empty sequence.
    pub fn new_sequence(&self) -> SequenceKv {
        SequenceKv::default()
    }

    fn alloc(&mut self, s: usize) -> Result<usize> {
        let block = self.store_block_bytes(s);
        let mut over = false;
        if let Some(max) = self.cfg.max_bytes {
            if self.bytes_in_use() + block > max {
                return Err(ModelError::Limit(format!(
                    "KV cache is full: {} bytes in use, limit {max} bytes",
                    self.bytes_in_use()
                )));
            }
            over = self.bytes_allocated() + block > max;
        }
        if let Some(cap) = self.pool.as_ref().map(|p| p.blocks[s]) {
            return self.alloc_pooled(s, cap);
        }
        // A free block; else, when new memory would pass the limit, the least recently used
        // cached block (of this kind, or the other kind's memory given back).
        let mut id = self.stores[s].free.pop();
        if id.is_none() && over {
            id = self.stores[s].evict();
            if id.is_none()
                && let Some(other) = self.stores[1 - s].evict()
            {
                self.stores[1 - s].blocks[other].clear();
                self.stores[1 - s].free.push(other);
            }
        }
        let (kv_heads, bs, hd, dtype) = (
            self.kv_heads,
            self.cfg.block_size,
            self.head_dim,
            self.dtype,
        );
        let device = self.device.clone();
        let st = &mut self.stores[s];
        let n_layers = st.layers.len();
        let make = || -> Result<Vec<(Tensor, Tensor)>> {
            (0..n_layers)
                .map(|_| {
                    Ok((
                        Tensor::zeros((kv_heads, bs, hd), dtype, &device)?,
                        Tensor::zeros((kv_heads, bs, hd), dtype, &device)?,
                    ))
                })
                .collect()
        };
        let id = match id {
            Some(id) => {
                if st.blocks[id].is_empty() {
                    st.blocks[id] = make()?;
                }
                id
            }
            None => {
                st.blocks.push(make()?);
                st.meta.push(BlockMeta::default());
                st.blocks.len() - 1
            }
        };
        st.hold(id);
        Ok(id)
    }

    /// Makes sure blocks exist for positions `[seq.len, seq.len + n)`.
    pub fn reserve(&mut self, seq: &mut SequenceKv, n: usize) -> Result<()> {
        if seq.released {
            return Err(ModelError::InvalidInput(
                "sequence was already released from the KV cache".into(),
            ));
        }
        let end = seq.len + n;
        let bs = self.cfg.block_size;
        for s in 0..2 {
            if self.stores[s].layers.is_empty() {
                continue;
            }
            let mut next = self.next_block_start(seq, s);
            while next < end {
                let id = self.alloc(s)?;
                seq.tables[s].push_back(BlockRef { id, start: next });
                next += bs;
            }
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) for positions `[seq.len, seq.len + n)` of
    /// model layer `layer`. Call [`KvCache::reserve`] first.
    pub fn write(&self, seq: &SequenceKv, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if self.pool.is_some() {
            return Err(ModelError::InvalidInput(
                "a paged KV cache is written by the paged attention step".into(),
            ));
        }
        let (s, li) = self.layer_slot[layer];
        let n = k.dim(1)?;
        let bs = self.cfg.block_size;
        let mut pos = seq.len;
        let mut row = 0;
        let table = &seq.tables[s];
        let first = table
            .front()
            .ok_or_else(|| ModelError::InvalidInput("write before reserve".into()))?
            .start;
        while row < n {
            let bi = (pos - first) / bs;
            let b = table
                .get(bi)
                .ok_or_else(|| ModelError::InvalidInput("write beyond reserved blocks".into()))?;
            let off = pos - b.start;
            let take = (bs - off).min(n - row);
            let (bk, bv) = &self.stores[s].blocks[b.id][li];
            bk.slice_set(&k.narrow(1, row, take)?.contiguous()?, 1, off)?;
            bv.slice_set(&v.narrow(1, row, take)?.contiguous()?, 1, off)?;
            pos += take;
            row += take;
        }
        Ok(())
    }

    /// All cached rows of layer `layer` up to (excluding) position `end`, as contiguous
    /// `[kv_heads, rows, head_dim]` tensors, plus the position of the first row returned.
    /// Sliding layers return only the blocks still held (a superset of the window).
    pub fn gather(
        &self,
        seq: &SequenceKv,
        layer: usize,
        end: usize,
    ) -> Result<(Tensor, Tensor, usize)> {
        let (s, li) = self.layer_slot[layer];
        let table = &seq.tables[s];
        let first = table
            .front()
            .ok_or_else(|| ModelError::InvalidInput("gather from an empty sequence".into()))?
            .start;
        let bs = self.cfg.block_size;
        let nblocks = (end - first).div_ceil(bs);
        if let Some((kp, vp)) = self.pool(layer) {
            let ids: Vec<u32> = table.iter().take(nblocks).map(|b| b.id as u32).collect();
            let idx = Tensor::new(ids.as_slice(), &self.device)?;
            let rows = |p: &Tensor| -> Result<Tensor> {
                let g = p.index_select(&idx, 0)?;
                let (nb, _, kvh, hd) = g.dims4()?;
                Ok(g.reshape((nb * bs, kvh, hd))?
                    .narrow(0, 0, end - first)?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            return Ok((rows(kp)?, rows(vp)?, first));
        }
        let blocks = &self.stores[s].blocks;
        let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) = table
            .iter()
            .take(nblocks)
            .map(|b| {
                let (k, v) = &blocks[b.id][li];
                (k, v)
            })
            .unzip();
        let k = Tensor::cat(&ks, 1)?.narrow(1, 0, end - first)?;
        let v = Tensor::cat(&vs, 1)?.narrow(1, 0, end - first)?;
        Ok((k, v, first))
    }

    /// Runs `f` over the cached f32 rows of layer `layer` of each `(sequence, end)` in `seqs`
    /// (the rows before position `end`), block by block, read in place (no copy): the fast
    /// path of CPU decode attention, one call for every decoding sequence of a step. `None`
    /// unless the cache holds f32 on the CPU.
    pub fn with_cpu_rows<R>(
        &self,
        seqs: &[(&SequenceKv, usize)],
        layer: usize,
        f: impl FnOnce(&[CpuRows<'_>]) -> R,
    ) -> Result<Option<R>> {
        if self.dtype != DType::F32 || !self.device.is_cpu() || self.pool.is_some() {
            return Ok(None);
        }
        let (s, li) = self.layer_slot[layer];
        let bs = self.cfg.block_size;
        // The storage read guards of every block, held while `f` runs.
        let mut guards = Vec::with_capacity(seqs.len());
        for &(seq, end) in seqs {
            let table = &seq.tables[s];
            let Some(first) = table.front().map(|b| b.start) else {
                return Ok(None);
            };
            let held: Vec<_> = table
                .iter()
                .take((end - first).div_ceil(bs))
                .map(|b| {
                    let (k, v) = &self.stores[s].blocks[b.id][li];
                    let (gk, lk) = k.storage_and_layout();
                    let (gv, lv) = v.storage_and_layout();
                    (gk, lk.start_offset(), gv, lv.start_offset())
                })
                .collect();
            guards.push((first, end, held));
        }
        let mut all = Vec::with_capacity(guards.len());
        for (first, end, held) in &guards {
            let mut blocks = Vec::with_capacity(held.len());
            for (i, (gk, ok, gv, ov)) in held.iter().enumerate() {
                let (candle_core::Storage::Cpu(ck), candle_core::Storage::Cpu(cv)) = (&**gk, &**gv)
                else {
                    return Ok(None);
                };
                let rows = bs.min(end - (first + i * bs));
                blocks.push((
                    &ck.as_slice::<f32>()?[*ok..],
                    &cv.as_slice::<f32>()?[*ov..],
                    rows,
                ));
            }
            all.push(CpuRows {
                blocks,
                block_size: bs,
                head_dim: self.head_dim,
            });
        }
        Ok(Some(f(&all)))
    }

    /// Marks the positions of `tokens` (written by the forward call) as cached, keys the blocks
    /// they fill when prefix caching is on, and frees sliding blocks no future query can see.
    pub fn commit(&mut self, seq: &mut SequenceKv, tokens: &[u32]) {
        let bs = self.cfg.block_size;
        if self.prefix_caching {
            for (i, &t) in tokens.iter().enumerate() {
                seq.partial.push(t);
                if seq.partial.len() == bs {
                    let h = block_hash(seq.last_hash, seq.salt, &seq.partial);
                    let start = seq.len + i + 1 - bs;
                    self.register(seq, start, h);
                    seq.last_hash = h;
                    seq.partial.clear();
                }
            }
        }
        seq.len += tokens.len();
        // The next query is at position seq.len; it sees keys k > seq.len - window.
        let min_visible = (seq.len + 1).saturating_sub(self.window);
        while let Some(b) = seq.tables[0].front().copied() {
            if b.start + bs <= min_visible && seq.tables[0].len() > 1 {
                seq.tables[0].pop_front();
                self.stores[0].unhold(b.id, &mut self.tick);
            } else {
                break;
            }
        }
        self.bound_cache();
    }

    /// Keys the block of each kind that starts at `start` by `hash`, unless an equal block is
    /// cached already.
    fn register(&mut self, seq: &SequenceKv, start: usize, hash: u128) {
        for (s, table) in seq.tables.iter().enumerate() {
            let st = &mut self.stores[s];
            if st.layers.is_empty() || st.cached.contains_key(&hash) {
                continue;
            }
            if let Some(b) = table.iter().find(|b| b.start == start)
                && st.meta[b.id].hash.is_none()
            {
                st.meta[b.id].hash = Some(hash);
                st.cached.insert(hash, b.id);
            }
        }
    }

    /// Returns every block of a finished (or cancelled) sequence to the free list.
    pub fn release(&mut self, seq: &mut SequenceKv) {
        for s in 0..2 {
            while let Some(b) = seq.tables[s].pop_front() {
                self.stores[s].unhold(b.id, &mut self.tick);
            }
        }
        seq.released = true;
        seq.len = 0;
        seq.partial.clear();
        seq.last_hash = 0;
        self.bound_cache();
    }

    /// Without a byte limit, unheld cached blocks are kept up to [`UNBOUNDED_PREFIX_CACHE_BYTES`]
    /// (oldest given back first); with one, they are evicted when blocks run out.
    fn bound_cache(&mut self) {
        if self.cfg.max_bytes.is_some() {
            return;
        }
        let cached =
            |st: &[BlockStore; 2], b: [usize; 2]| st[0].lru.len() * b[0] + st[1].lru.len() * b[1];
        let bytes = [self.store_block_bytes(0), self.store_block_bytes(1)];
        while cached(&self.stores, bytes) > UNBOUNDED_PREFIX_CACHE_BYTES {
            let oldest = |s: usize| self.stores[s].lru.first_key_value().map(|(t, _)| *t);
            let s = match (oldest(0), oldest(1)) {
                (Some(a), Some(b)) => usize::from(b < a),
                (Some(_), None) => 0,
                (None, _) => 1,
            };
            if let Some(id) = self.stores[s].evict() {
                self.stores[s].blocks[id].clear();
                self.stores[s].free.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeParams;

    fn cfg(layers: usize, window: usize) -> TextConfig {
        TextConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 8,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            query_pre_attn_scalar: 4.0,
            rms_norm_eps: 1e-6,
            sliding_window: window,
            layer_types: (0..layers)
                .map(|i| {
                    if (i + 1) % 2 == 0 {
                        LayerType::Global
                    } else {
                        LayerType::Sliding
                    }
                })
                .collect(),
            rope_global: RopeParams {
                theta: 1e6,
                linear_factor: 1.0,
            },
            rope_local: RopeParams {
                theta: 1e4,
                linear_factor: 1.0,
            },
            max_position_embeddings: 1000,
            tie_word_embeddings: true,
            bos_token_id: Some(2),
            pad_token_id: Some(0),
            eos_token_ids: vec![1],
        }
    }

    fn rows(start: usize, n: usize) -> Tensor {
        let v: Vec<f32> = (start..start + n).flat_map(|p| [p as f32; 4]).collect();
        Tensor::from_vec(v, (1, n, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn write_gather_round_trip_across_blocks() -> Result<()> {
        let c = cfg(2, 1000);
        let mut kv = KvCache::new(
            &c,
            DType::F32,
            &Device::Cpu,
            KvCacheConfig {
                block_size: 4,
                max_bytes: None,
                paged_blocks: None,
            },
        );
        let mut s = kv.new_sequence();
        for (start, n) in [(0, 6), (6, 1), (7, 5)] {
            kv.reserve(&mut s, n)?;
            for layer in 0..2 {
                kv.write(&s, layer, &rows(start, n), &rows(start, n))?;
            }
            kv.commit(&mut s, &vec![0; n]);
        }
        let (k, _, first) = kv.gather(&s, 1, 12)?;
        assert_eq!(first, 0);
        let got: Vec<f32> = k.squeeze(0)?.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(got, (0..12).map(|p| p as f32).collect::<Vec<_>>());
        assert_eq!(kv.blocks_in_use(), (3, 3));
        kv.release(&mut s);
        assert_eq!(kv.bytes_in_use(), 0);
        assert!(kv.bytes_allocated() > 0);
        kv.trim();
        assert_eq!(kv.bytes_allocated(), 0);
        Ok(())
    }

    #[test]
    fn sliding_layers_keep_only_their_window() -> Result<()> {
        let c = cfg(2, 5);
        let mut kv = KvCache::new(
            &c,
            DType::F32,
            &Device::Cpu,
            KvCacheConfig {
                block_size: 2,
                max_bytes: None,
                paged_blocks: None,
            },
        );
        let mut s = kv.new_sequence();
        for p in 0..40 {
            kv.reserve(&mut s, 1)?;
            for layer in 0..2 {
                kv.write(&s, layer, &rows(p, 1), &rows(p, 1))?;
            }
            kv.commit(&mut s, &[0]);
            // The next query (position p + 1) must still see p + 1 - 4 ..= p.
            let (k, _, first) = kv.gather(&s, 0, p + 1)?;
            let lo = (p + 2).saturating_sub(5);
            assert!(first <= lo, "first {first} > needed {lo}");
            let vals: Vec<f32> = k.squeeze(0)?.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
            assert_eq!(vals[lo - first], lo as f32);
        }
        let (sliding, global) = kv.blocks_in_use();
        assert!(sliding <= 4, "sliding blocks {sliding}");
        assert_eq!(global, 20);
        Ok(())
    }

    #[test]
    fn byte_limit_is_enforced() {
        let c = cfg(2, 100);
        let mut kv = KvCache::new(
            &c,
            DType::F32,
            &Device::Cpu,
            KvCacheConfig {
                block_size: 4,
                max_bytes: Some(600),
                paged_blocks: None,
            },
        );
        let mut s = kv.new_sequence();
        let e = kv.reserve(&mut s, 40).unwrap_err();
        assert!(e.to_string().contains("KV cache is full"), "{e}");
    }
}
