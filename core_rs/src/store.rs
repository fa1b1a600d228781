//! The device store: live positions sorted by H3 cell, with in-place moves.
//!
//! Layout (28 bytes a device, plus about 6 to 11 in the key table, whatever the density):
//! - a slab of columns indexed by slot: device id, gateway, fixed-point position, the
//!   second it was last seen (0 marks a dead slot), and the cell's place in its group;
//! - the *sorted prefix* of the slab, ordered by storage cell, with a directory of the
//!   cell *groups* present and where each one starts. A group is the set of storage
//!   cells under one ancestor four resolutions coarser (2,401 cells); a slot keeps the
//!   last four digits of its cell (12 bits), so the directory stays small however
//!   sparse the population is;
//! - the *appended tail*: devices that arrived or changed cell since the last
//!   compaction, with their cell, and an ordered map from cell to their slots;
//! - a key table from (gateway, device id) to slot, split in shards by hash so that a
//!   large batch is applied on every core.
//!
//! A report that keeps a device in its cell rewrites its slot in place. One that moves
//! it to another cell kills the old slot and appends a new one. When dead and appended
//! slots pile up, compaction merges the tail into the prefix in one pass.

use crate::cover::{cover_disk, CellRange, Locate};
use crate::error::InputError;
use crate::geo::{fixed_vector, Disk, FixedVec};
use h3o::{LatLng, Resolution};
use hashbrown::HashTable;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;

/// Number of key-table shards (a power of two).
const SHARDS: usize = 16;
/// Batches up to this size are applied on one thread: splitting costs more.
const PARALLEL_ABOVE: usize = 16_384;

/// Identity of a device: its partner app's gateway and the id that app gave it. Two
/// gateways may use the same id for different phones; they are different devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub gateway: u16,
    pub id: u64,
}

/// A batch of checked location reports, as columns of equal length.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub ids: &'a [u64],
    /// One gateway per report, or a single one for all.
    pub gateways: &'a [u16],
    /// Degrees.
    pub lat: &'a [f64],
    /// Degrees.
    pub lng: &'a [f64],
    /// Unix seconds, from 1 to 2^32 - 1; kept to the whole second.
    pub seen: &'a [f64],
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    #[inline]
    pub fn key(&self, i: usize) -> DeviceKey {
        let gateway = if self.gateways.len() == 1 { self.gateways[0] } else { self.gateways[i] };
        DeviceKey { gateway, id: self.ids[i] }
    }

    #[inline]
    pub fn seen(&self, i: usize) -> u32 {
        self.seen[i].floor() as u32
    }
}

/// What a batch of reports did. Each device reported counts once, in `added` or
/// `updated` when a report of it was applied, in `stale` otherwise; its further reports
/// in the batch count in `stale`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpsertOutcome {
    /// Devices new to the index, or back after removal or expiry.
    pub added: usize,
    /// Live devices whose position was replaced.
    pub updated: usize,
    /// Reports older than what the index held, and further reports of a device already
    /// counted in the batch.
    pub stale: usize,
}

fn hash_key(key: DeviceKey) -> u64 {
    // Fixed seeds: the layout of a store is reproducible from run to run.
    const STATE: ahash::RandomState = ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    );
    STATE.hash_one(key)
}

fn shard_of(hash: u64) -> usize {
    // Middle bits: hashbrown uses the low bits for the bucket and the top seven for
    // its tags, so sharding on either would crowd a shard's table.
    ((hash >> 32) as usize) & (SHARDS - 1)
}

/// Slot columns. Invariant: all four have the same length.
#[derive(Default)]
struct Slab {
    ids: Vec<u64>,
    gateways: Vec<u16>,
    positions: Vec<FixedVec>,
    seen: Vec<u32>,
    /// The storage cell's digits below its group (see [`Grouping`]).
    digits: Vec<u16>,
}

impl Slab {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn key(&self, slot: u32) -> DeviceKey {
        DeviceKey { gateway: self.gateways[slot as usize], id: self.ids[slot as usize] }
    }

    /// Whether a slot holds `key`; reads the gateway column only when the id matches.
    #[inline]
    fn has_key(&self, slot: u32, key: DeviceKey) -> bool {
        self.ids[slot as usize] == key.id && self.gateways[slot as usize] == key.gateway
    }

    fn push(&mut self, key: DeviceKey, position: FixedVec, seen: u32, digits: u16) {
        self.ids.push(key.id);
        self.gateways.push(key.gateway);
        self.positions.push(position);
        self.seen.push(seen);
        self.digits.push(digits);
    }

    fn gather(&self, order: &[u32]) -> Slab {
        fn take<T: Copy + Send + Sync>(column: &[T], order: &[u32]) -> Vec<T> {
            order.par_iter().map(|&slot| column[slot as usize]).collect()
        }
        Slab {
            ids: take(&self.ids, order),
            gateways: take(&self.gateways, order),
            positions: take(&self.positions, order),
            seen: take(&self.seen, order),
            digits: take(&self.digits, order),
        }
    }

    fn bytes(&self) -> usize {
        self.ids.capacity() * 8
            + self.gateways.capacity() * 2
            + self.positions.capacity() * 12
            + self.seen.capacity() * 4
            + self.digits.capacity() * 2
    }
}

/// Hash of the key, storage cell, and position of one report.
pub type Prepared = (u64, u64, FixedVec);

/// Splits storage cell ids into a group (the id with its last [`GROUP_DIGITS`] digits
/// cleared) and those digits.
///
/// In an H3 cell id, each resolution's digit takes three bits, coarsest first, and the
/// digits past the cell's resolution are all 7; so the ids of one group are contiguous,
/// and ordering ids is ordering (group, digits).
#[derive(Clone, Copy, Debug)]
struct Grouping {
    /// Bit offset of the last digit of a storage cell.
    shift: u32,
}

/// Digits of a storage cell kept per slot: 4 digits of 3 bits fit in a `u16`.
const GROUP_DIGITS: u32 = 4;
const DIGITS_MASK: u64 = (1 << (3 * GROUP_DIGITS)) - 1;

impl Grouping {
    fn new(storage: Resolution) -> Self {
        Self { shift: 3 * (15 - u32::from(u8::from(storage))) }
    }

    #[inline]
    fn group(self, cell: u64) -> u64 {
        cell & !(DIGITS_MASK << self.shift)
    }

    #[inline]
    fn digits(self, cell: u64) -> u16 {
        ((cell >> self.shift) & DIGITS_MASK) as u16
    }

    #[inline]
    fn cell(self, group: u64, digits: u16) -> u64 {
        group | (u64::from(digits) << self.shift)
    }
}

/// A column written from several threads at distinct indices.
struct SharedColumn<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the users of a SharedColumn write each index from one thread at most, and
// the column outlives them (it is borrowed mutably for the SharedColumn's life).
unsafe impl<T: Send> Sync for SharedColumn<T> {}
unsafe impl<T: Send> Send for SharedColumn<T> {}

impl<T: Copy> SharedColumn<T> {
    fn new(column: &mut [T]) -> Self {
        Self { ptr: column.as_mut_ptr(), len: column.len() }
    }

    /// # Safety
    /// No other thread writes index `i` meanwhile.
    unsafe fn get(&self, i: usize) -> T {
        assert!(i < self.len);
        unsafe { *self.ptr.add(i) }
    }

    /// # Safety
    /// No other thread reads or writes index `i` meanwhile.
    unsafe fn set(&self, i: usize, value: T) {
        assert!(i < self.len);
        unsafe { *self.ptr.add(i) = value }
    }
}

/// Where the store keeps the devices of a range of storage cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Slots of the sorted prefix.
    pub prefix: Range<usize>,
    /// Whether the tail may hold some too.
    pub in_tail: bool,
}

impl Locate for Store {
    type Place = Place;

    fn locate(&self, first: u64, last: u64, within: Option<&Place>) -> Place {
        let hint = within.map_or(0..self.sorted_len, |p| p.prefix.clone());
        let in_tail = within.is_none_or(|p| p.in_tail)
            && self.tail_by_cell.range(first..=last).next().is_some();
        Place { prefix: self.prefix_slots(first, last, hint), in_tail }
    }

    fn count(&self, place: &Place) -> usize {
        place.prefix.len() + usize::from(place.in_tail)
    }
}

/// Spacing of the fences over the directory.
const FENCE: usize = 64;

/// `values.partition_point(pred)` for ascending `values`, searching `fences` (every
/// [`FENCE`]-th value) first.
#[inline]
fn fenced_partition<T>(values: &[T], fences: &[T], pred: impl Fn(&T) -> bool) -> usize {
    let block = fences.partition_point(&pred);
    if block == 0 {
        return 0;
    }
    // values[(block - 1) * FENCE] satisfies pred; the boundary is in the next FENCE.
    let start = (block - 1) * FENCE;
    let end = (start + FENCE + 1).min(values.len());
    start + values[start..end].partition_point(pred)
}

/// Marks a report whose device is not in the key table.
const NO_SLOT: u32 = u32::MAX;

/// Live device positions filed by H3 cell, answering radius queries exactly.
pub struct Store {
    storage: Resolution,
    slab: Slab,
    /// Slots `[0, sorted_len)` are ordered by storage cell.
    sorted_len: usize,
    grouping: Grouping,
    /// Distinct cell groups of the sorted prefix, ascending.
    dir_groups: Vec<u64>,
    /// `dir_start[i]..dir_start[i + 1]` are the slots of `dir_groups[i]`; one entry
    /// more than `dir_groups`, the last one `sorted_len`.
    dir_start: Vec<u32>,
    /// Every [`FENCE`]-th entry of `dir_groups` and `dir_start`: a small copy that stays
    /// in cache and narrows each binary search to one block.
    group_fences: Vec<u64>,
    start_fences: Vec<u32>,
    /// Storage cell of each appended slot (`slot - sorted_len`).
    tail_cells: Vec<u64>,
    /// Appended slots by storage cell.
    tail_by_cell: BTreeMap<u64, Vec<u32>>,
    shards: Vec<HashTable<u32>>,
    /// Devices in the key table (live or expired, not yet dropped).
    stored: usize,
    /// Slots marked dead since the last compaction.
    dead: usize,
    /// No stored device was seen before this second.
    oldest_seen: u32,
    /// Gateways that ever reported a device (to forget an id on all of them).
    gateway_used: Vec<bool>,
}

impl Store {
    /// An empty store filing devices at `storage` resolution.
    pub fn new(storage: Resolution) -> Self {
        Self {
            storage,
            slab: Slab::default(),
            sorted_len: 0,
            grouping: Grouping::new(storage),
            dir_groups: Vec::new(),
            dir_start: vec![0],
            group_fences: Vec::new(),
            start_fences: vec![0],
            tail_cells: Vec::new(),
            tail_by_cell: BTreeMap::new(),
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            stored: 0,
            dead: 0,
            oldest_seen: u32::MAX,
            gateway_used: vec![false; 1 << 16],
        }
    }

    pub fn storage_resolution(&self) -> Resolution {
        self.storage
    }

    /// Devices held, including expired ones not yet dropped by [`Store::expire`].
    pub fn stored(&self) -> usize {
        self.stored
    }

    /// Heap bytes held by the store (capacity, not length).
    pub fn bytes(&self) -> usize {
        let tables: usize = self.shards.iter().map(|t| t.capacity() * 5 + 16).sum();
        let tail_map: usize = self.tail_by_cell.values().map(|v| v.capacity() * 4 + 48).sum();
        self.slab.bytes()
            + self.dir_groups.capacity() * 8
            + self.dir_start.capacity() * 4
            + self.tail_cells.capacity() * 8
            + tail_map
            + tables
    }

    /// Slots appended since the last compaction.
    pub fn tail_len(&self) -> usize {
        self.slab.len() - self.sorted_len
    }

    fn find(&self, hash: u64, key: DeviceKey) -> Option<u32> {
        let slab = &self.slab;
        self.shards[shard_of(hash)].find(hash, |&slot| slab.has_key(slot, key)).copied()
    }

    /// The position and last-seen second held for a device, if any.
    pub fn position_of(&self, key: DeviceKey) -> Option<(FixedVec, u32)> {
        let slot = self.find(hash_key(key), key)? as usize;
        Some((self.slab.positions[slot], self.slab.seen[slot]))
    }

    /// Storage cell a slot is filed under.
    fn cell_of(&self, slot: u32) -> u64 {
        let slot = slot as usize;
        if slot < self.sorted_len {
            // dir_start is ascending; the cell is the last one starting at or before.
            let i =
                fenced_partition(&self.dir_start, &self.start_fences, |&s| s as usize <= slot) - 1;
            self.grouping.cell(self.dir_groups[i], self.slab.digits[slot])
        } else {
            self.tail_cells[slot - self.sorted_len]
        }
    }

    /// Hash, storage cell and fixed-point position of each report: the costly part of
    /// applying a batch, which needs no access to the store.
    pub fn prepare(storage: Resolution, batch: &Batch<'_>) -> Vec<Prepared> {
        let prepare = |i: usize| {
            let (lat, lng) = (batch.lat[i], batch.lng[i]);
            let ll = LatLng::new(lat, lng).expect("reports are checked");
            (hash_key(batch.key(i)), u64::from(ll.to_cell(storage)), fixed_vector(lat, lng))
        };
        if batch.len() > PARALLEL_ABOVE {
            (0..batch.len()).into_par_iter().map(prepare).collect()
        } else {
            (0..batch.len()).map(prepare).collect()
        }
    }

    /// Where each report's device is now: its slot, and whether the report keeps it in
    /// the same storage cell. Reads only: queries can run meanwhile; the store must not
    /// change before [`Store::apply`] uses the result.
    pub fn locate(&self, batch: &Batch<'_>, prepared: &[Prepared]) -> Vec<(u32, bool)> {
        let locate = |(i, &(hash, cell, _)): (usize, &Prepared)| match self.find(hash, batch.key(i))
        {
            None => (NO_SLOT, false),
            Some(slot) => (slot, self.cell_of(slot) == cell),
        };
        if self.stored == 0 {
            vec![(NO_SLOT, false); batch.len()]
        } else if batch.len() > PARALLEL_ABOVE {
            prepared.par_iter().enumerate().map(locate).collect()
        } else {
            prepared.iter().enumerate().map(locate).collect()
        }
    }

    /// Applies a batch of checked reports prepared by [`Store::prepare`] at this store's
    /// resolution and located by [`Store::locate`] on the store as it is. A report older
    /// than the stored position of its device is ignored; within the batch the newest
    /// report of a device wins (the later one on equal times).
    ///
    /// Each device reported counts once in the outcome, as added (new, or held but
    /// last seen before `cutoff`), updated, or stale; its other reports count as stale.
    pub fn apply(
        &mut self,
        batch: &Batch<'_>,
        prepared: &[Prepared],
        located: &[(u32, bool)],
        cutoff: u32,
    ) -> UpsertOutcome {
        assert_eq!(batch.len(), prepared.len());
        assert_eq!(batch.len(), located.len());
        if batch.gateways.len() == 1 {
            self.gateway_used[usize::from(batch.gateways[0])] = true;
        } else {
            batch.gateways.iter().for_each(|&g| self.gateway_used[usize::from(g)] = true);
        }
        if self.slab.len() == 0 && batch.len() > PARALLEL_ABOVE {
            return self.load_into_empty(batch, prepared);
        }

        // Write the slab in report order. A device found in the key table is rewritten
        // in place, or moved to a new slot when it changes cell; unknown devices get a
        // new slot. The key table itself is updated afterwards, shard by shard, so a
        // device reported twice in the batch is followed through `moved`.
        let mut outcome = UpsertOutcome::default();
        let done = self.rewrite_in_place(batch, prepared, located, cutoff, &mut outcome);
        let mut new_devices = 0;
        // Held devices already counted in this batch, by their slot before it.
        let mut counted: hashbrown::HashSet<u32> = hashbrown::HashSet::new();
        let first_new = self.slab.len() as u32;
        let mut moved: hashbrown::HashMap<u32, u32> = hashbrown::HashMap::new();
        let mut fresh: Vec<Vec<(u64, u32)>> = vec![Vec::new(); SHARDS];
        for (i, (&(hash, cell, position), &(found, same_cell))) in
            prepared.iter().zip(located).enumerate()
        {
            if done.get(i).is_some_and(|&d| d) {
                continue;
            }
            let seen = batch.seen(i);
            self.oldest_seen = self.oldest_seen.min(seen);
            let mut slot = found;
            let mut same_cell = same_cell;
            if slot != NO_SLOT && self.slab.seen[slot as usize] == 0 {
                // Moved earlier in this batch: follow it to its latest slot.
                slot = moved[&slot];
                same_cell = self.cell_of(slot) == cell;
            }
            if slot == NO_SLOT {
                new_devices += 1;
                let new = self.append(batch.key(i), position, seen, cell);
                fresh[shard_of(hash)].push((hash, new));
                continue;
            }
            let held = self.slab.seen[slot as usize];
            if seen < held || !counted.insert(found) {
                outcome.stale += 1;
            } else if held < cutoff {
                outcome.added += 1;
            } else {
                outcome.updated += 1;
            }
            if seen < held {
                continue;
            }
            if same_cell {
                self.slab.positions[slot as usize] = position;
                self.slab.seen[slot as usize] = seen;
            } else {
                self.slab.seen[slot as usize] = 0;
                self.dead += 1;
                let new = self.append(batch.key(i), position, seen, cell);
                moved.insert(found, new);
                if slot != found {
                    moved.insert(slot, new);
                }
            }
        }

        // Moves: point the key table at the latest slot of each moved device.
        for (&old, &new) in &moved {
            if old >= first_new {
                continue; // a slot appended and left again within this batch
            }
            let hash = hash_key(self.slab.key(new));
            let table = &mut self.shards[shard_of(hash)];
            *table.find_mut(hash, |&s| s == old).expect("a moved device is in the table") = new;
        }

        // New devices, shard by shard. A device new to the index reported twice in the
        // batch got two slots: the older report's slot dies.
        let slab = &self.slab;
        let insert = |(table, fresh): (&mut HashTable<u32>, &Vec<(u64, u32)>)| {
            let rehash = |&s: &u32| hash_key(slab.key(s));
            table.reserve(fresh.len(), rehash);
            let mut losers = Vec::new();
            for &(hash, slot) in fresh {
                let key = slab.key(slot);
                match table.entry(hash, |&s| slab.key(s) == key, rehash) {
                    hashbrown::hash_table::Entry::Vacant(entry) => {
                        entry.insert(slot);
                    }
                    hashbrown::hash_table::Entry::Occupied(mut entry) => {
                        let held = *entry.get();
                        if slab.seen[slot as usize] >= slab.seen[held as usize] {
                            *entry.get_mut() = slot;
                            losers.push(held);
                        } else {
                            losers.push(slot);
                        }
                    }
                }
            }
            losers
        };
        let losers: Vec<Vec<u32>> = if batch.len() > PARALLEL_ABOVE {
            self.shards.par_iter_mut().zip(fresh.par_iter()).map(insert).collect()
        } else {
            self.shards.iter_mut().zip(&fresh).map(insert).collect()
        };
        for slot in losers.into_iter().flatten() {
            self.slab.seen[slot as usize] = 0;
            self.dead += 1;
            new_devices -= 1;
            outcome.stale += 1;
        }
        self.stored += new_devices;
        outcome.added += new_devices;

        // Index the tail by cell, or fold it into the prefix when it has grown.
        if self.worth_compacting() {
            self.compact();
        } else {
            for slot in first_new..self.slab.len() as u32 {
                if self.slab.seen[slot as usize] != 0 {
                    let cell = self.tail_cells[slot as usize - self.sorted_len];
                    self.tail_by_cell.entry(cell).or_default().push(slot);
                }
            }
        }
        outcome
    }

    /// Loads a large batch into an empty store: sorts the reports by cell and writes
    /// them straight into the sorted prefix, with no tail and no compaction.
    fn load_into_empty(&mut self, batch: &Batch<'_>, prepared: &[Prepared]) -> UpsertOutcome {
        let n = batch.len();
        let mut order: Vec<(u64, u32)> =
            prepared.par_iter().enumerate().map(|(i, p)| (p.1, i as u32)).collect();
        order.par_sort_unstable();

        let grouping = self.grouping;
        self.slab = Slab {
            ids: order.par_iter().map(|&(_, i)| batch.ids[i as usize]).collect(),
            gateways: order.par_iter().map(|&(_, i)| batch.key(i as usize).gateway).collect(),
            positions: order.par_iter().map(|&(_, i)| prepared[i as usize].2).collect(),
            seen: order.par_iter().map(|&(_, i)| batch.seen(i as usize)).collect(),
            digits: order.par_iter().map(|&(cell, _)| grouping.digits(cell)).collect(),
        };
        let mut dir_groups = Vec::new();
        let mut dir_start = Vec::new();
        for (k, &(cell, _)) in order.iter().enumerate() {
            let group = grouping.group(cell);
            if dir_groups.last() != Some(&group) {
                dir_groups.push(group);
                dir_start.push(k as u32);
            }
        }
        dir_start.push(n as u32);
        self.group_fences = dir_groups.iter().step_by(FENCE).copied().collect();
        self.start_fences = dir_start.iter().step_by(FENCE).copied().collect();
        self.dir_groups = dir_groups;
        self.dir_start = dir_start;
        self.sorted_len = n;
        self.oldest_seen = self.slab.seen.par_iter().copied().min().unwrap_or(u32::MAX);

        // The key table, shard by shard. A device reported twice keeps its newest
        // report (the later one on equal times); the other slot dies.
        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); SHARDS];
        for (slot, &(_, i)) in order.iter().enumerate() {
            by_shard[shard_of(prepared[i as usize].0)].push(slot as u32);
        }
        let slab = &self.slab;
        let wins = |a: u32, b: u32| {
            (slab.seen[a as usize], order[a as usize].1)
                > (slab.seen[b as usize], order[b as usize].1)
        };
        let losers: Vec<u32> = self
            .shards
            .par_iter_mut()
            .zip(by_shard.par_iter())
            .flat_map_iter(|(table, slots)| {
                let rehash = |&s: &u32| hash_key(slab.key(s));
                table.reserve(slots.len(), rehash);
                let mut losers = Vec::new();
                for &slot in slots {
                    let key = slab.key(slot);
                    let hash = prepared[order[slot as usize].1 as usize].0;
                    match table.entry(hash, |&s| slab.has_key(s, key), rehash) {
                        hashbrown::hash_table::Entry::Vacant(entry) => {
                            entry.insert(slot);
                        }
                        hashbrown::hash_table::Entry::Occupied(mut entry) => {
                            let held = *entry.get();
                            if wins(slot, held) {
                                *entry.get_mut() = slot;
                                losers.push(held);
                            } else {
                                losers.push(slot);
                            }
                        }
                    }
                }
                losers
            })
            .collect();
        for &slot in &losers {
            self.slab.seen[slot as usize] = 0;
        }
        self.dead = losers.len();
        self.stored = n - losers.len();
        UpsertOutcome { added: self.stored, updated: 0, stale: losers.len() }
    }

    /// Rewrites, on every core, the slots of devices that stay in their cell and are
    /// reported once in the batch (most reports of a large batch); returns which
    /// reports it handled. Small batches, or batches small beside the store, are left
    /// to the ordered loop: counting the claims on slots costs a byte per slot.
    fn rewrite_in_place(
        &mut self,
        batch: &Batch<'_>,
        prepared: &[Prepared],
        located: &[(u32, bool)],
        cutoff: u32,
        outcome: &mut UpsertOutcome,
    ) -> Vec<bool> {
        use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

        if batch.len() <= PARALLEL_ABOVE.max(self.slab.len() / 64) {
            return Vec::new();
        }
        let claims: Vec<AtomicU8> = (0..self.slab.len()).map(|_| AtomicU8::new(0)).collect();
        // Claims by every report of a held device, whatever it does: a device reported
        // twice must see its reports applied in order, by the loop.
        located.par_iter().for_each(|&(slot, _)| {
            if slot != NO_SLOT {
                let _ = claims[slot as usize]
                    .fetch_update(Relaxed, Relaxed, |c| (c < 2).then_some(c + 1));
            }
        });
        let positions = SharedColumn::new(&mut self.slab.positions);
        let seens = SharedColumn::new(&mut self.slab.seen);
        // 0: left to the ordered loop, 1: rewritten, 2: stale, 3: rewritten, and the
        // device had expired (it counts as added).
        let results: Vec<u8> = (0..batch.len())
            .into_par_iter()
            .map(|i| {
                let (slot, same_cell) = located[i];
                if slot == NO_SLOT || !same_cell || claims[slot as usize].load(Relaxed) != 1 {
                    return 0;
                }
                let (slot, seen) = (slot as usize, batch.seen(i));
                // SAFETY: claims[slot] == 1, so no other report of this batch reaches this
                // slot, and the caller holds the store exclusively.
                unsafe {
                    if seen < seens.get(slot) {
                        return 2;
                    }
                    let held = seens.get(slot);
                    positions.set(slot, prepared[i].2);
                    seens.set(slot, seen);
                    if held < cutoff {
                        return 3;
                    }
                }
                1
            })
            .collect();
        let mut done = Vec::with_capacity(results.len());
        for (i, &r) in results.iter().enumerate() {
            match r {
                1 | 3 => {
                    if r == 1 {
                        outcome.updated += 1;
                    } else {
                        outcome.added += 1;
                    }
                    self.oldest_seen = self.oldest_seen.min(batch.seen(i));
                }
                2 => outcome.stale += 1,
                _ => {}
            }
            done.push(r != 0);
        }
        done
    }

    fn append(&mut self, key: DeviceKey, position: FixedVec, seen: u32, cell: u64) -> u32 {
        let slot = self.slab.len() as u32;
        self.slab.push(key, position, seen, self.grouping.digits(cell));
        self.tail_cells.push(cell);
        slot
    }

    /// Forgets devices now. Returns how many were held.
    pub fn remove(&mut self, keys: &[DeviceKey]) -> usize {
        let mut removed = 0;
        for &key in keys {
            let hash = hash_key(key);
            let slab = &self.slab;
            let table = &mut self.shards[shard_of(hash)];
            if let Ok(entry) = table.find_entry(hash, |&s| slab.key(s) == key) {
                let (slot, _) = entry.remove();
                self.slab.seen[slot as usize] = 0;
                self.dead += 1;
                self.stored -= 1;
                removed += 1;
            }
        }
        self.compact_if_worth_it();
        removed
    }

    /// Gateways that ever reported a device, ascending.
    pub fn gateways(&self) -> Vec<u16> {
        (0..=u16::MAX).filter(|&g| self.gateway_used[usize::from(g)]).collect()
    }

    /// Gateways that hold a device with this id.
    pub fn gateways_of(&self, id: u64, gateways: &[u16]) -> Vec<DeviceKey> {
        gateways
            .iter()
            .map(|&gateway| DeviceKey { gateway, id })
            .filter(|&key| self.find(hash_key(key), key).is_some())
            .collect()
    }

    /// Drops devices last seen before `cutoff` (Unix seconds). Returns how many.
    pub fn expire(&mut self, cutoff: u32) -> usize {
        if cutoff <= self.oldest_seen {
            return 0;
        }
        let mut oldest = u32::MAX;
        let mut dropped = 0;
        let seen = &mut self.slab.seen;
        for table in &mut self.shards {
            table.retain(|&mut slot| {
                let s = seen[slot as usize];
                if s < cutoff {
                    seen[slot as usize] = 0;
                    dropped += 1;
                    false
                } else {
                    oldest = oldest.min(s);
                    true
                }
            });
        }
        self.oldest_seen = oldest;
        self.stored -= dropped;
        self.dead += dropped;
        self.compact_if_worth_it();
        dropped
    }

    /// Devices stored, if none of them was seen before `cutoff`.
    pub fn live_if_none_expired(&self, cutoff: u32) -> Option<usize> {
        (cutoff <= self.oldest_seen).then_some(self.stored)
    }

    /// Devices stored and seen at or after `cutoff`.
    pub fn live(&mut self, cutoff: u32) -> usize {
        self.expire(cutoff);
        self.stored
    }

    /// Whether the tail and the dead slots have grown enough to pay for a compaction,
    /// which copies every live device once. A move to another cell adds one tail slot
    /// and one dead slot, so at a quarter of the sorted prefix a compaction follows an
    /// eighth of the devices changing cell: about eight copies a move, and at most
    /// about 10 bytes a device of extra memory meanwhile.
    fn worth_compacting(&self) -> bool {
        self.tail_len() + self.dead > (self.sorted_len / 4).max(65_536)
    }

    fn compact_if_worth_it(&mut self) {
        if self.worth_compacting() {
            self.compact();
        }
    }

    /// Folds the tail into the sorted prefix and drops dead slots.
    pub fn compact(&mut self) {
        // The tail sorted by cell; stable on slot so a cell's devices keep their order.
        let start = self.sorted_len;
        let mut tail: Vec<(u64, u32)> = self
            .tail_cells
            .iter()
            .enumerate()
            .map(|(k, &cell)| (cell, (start + k) as u32))
            .filter(|&(_, slot)| self.slab.seen[slot as usize] != 0)
            .collect();
        tail.par_sort_unstable();

        // Merge prefix and tail group by group into the new order and directory. Within
        // a group, prefix slots are ordered by digits already; merge on the digits.
        let live = self.stored;
        let mut order: Vec<u32> = Vec::with_capacity(live);
        let mut dir_groups = Vec::with_capacity(self.dir_groups.len() + 1024);
        let mut dir_start = Vec::with_capacity(dir_groups.capacity() + 1);
        let (mut t, mut d) = (0, 0);
        let slab = &self.slab;
        let grouping = self.grouping;
        while d < self.dir_groups.len() || t < tail.len() {
            let dir_group = self.dir_groups.get(d).copied().unwrap_or(u64::MAX);
            let tail_group = tail.get(t).map_or(u64::MAX, |&(c, _)| grouping.group(c));
            let group = dir_group.min(tail_group);
            let before = order.len();
            let mut prefix = 0..0;
            if dir_group == group {
                prefix = self.dir_start[d] as usize..self.dir_start[d + 1] as usize;
                d += 1;
            }
            let mut prefix = prefix.filter(|&slot| slab.seen[slot] != 0).peekable();
            while t < tail.len() && grouping.group(tail[t].0) == group {
                let digits = grouping.digits(tail[t].0);
                while let Some(slot) = prefix.next_if(|&slot| slab.digits[slot] <= digits) {
                    order.push(slot as u32);
                }
                order.push(tail[t].1);
                t += 1;
            }
            order.extend(prefix.map(|slot| slot as u32));
            if order.len() > before {
                dir_groups.push(group);
                dir_start.push(before as u32);
            }
        }
        dir_start.push(order.len() as u32);
        debug_assert_eq!(order.len(), live);

        // Move the columns and renumber the key table.
        let mut renumber = vec![u32::MAX; self.slab.len()];
        for (new, &old) in order.iter().enumerate() {
            renumber[old as usize] = new as u32;
        }
        let slab = self.slab.gather(&order);
        self.shards.par_iter_mut().for_each(|table| {
            for slot in table.iter_mut() {
                *slot = renumber[*slot as usize];
            }
        });
        self.slab = slab;
        self.sorted_len = order.len();
        dir_groups.shrink_to_fit();
        dir_start.shrink_to_fit();
        self.group_fences = dir_groups.iter().step_by(FENCE).copied().collect();
        self.start_fences = dir_start.iter().step_by(FENCE).copied().collect();
        self.dir_groups = dir_groups;
        self.dir_start = dir_start;
        self.tail_cells = Vec::new();
        self.tail_by_cell = BTreeMap::new();
        self.dead = 0;
    }

    /// Slots of the sorted prefix filed in storage cells `[first, last]`, searched
    /// within `hint`, a slot range known to contain them.
    fn prefix_slots(&self, first: u64, last: u64, hint: Range<usize>) -> Range<usize> {
        let g = &self.grouping;
        let (first_group, last_group) = (g.group(first), g.group(last));
        let a = fenced_partition(&self.dir_groups, &self.group_fences, |&c| c < first_group);
        let b = fenced_partition(&self.dir_groups, &self.group_fences, |&c| c <= last_group);
        if a == b {
            return 0..0;
        }
        let mut start = (self.dir_start[a] as usize).max(hint.start);
        let mut end = (self.dir_start[b] as usize).min(hint.end).max(start);
        // The range may start or end inside a group: narrow by the digits there, which
        // are sorted within a group.
        if self.dir_groups[a] == first_group {
            let digits = g.digits(first);
            let group_end = (self.dir_start[a + 1] as usize).clamp(start, end);
            start += self.slab.digits[start..group_end].partition_point(|&d| d < digits);
        }
        if self.dir_groups[b - 1] == last_group {
            let digits = g.digits(last);
            let group_start = (self.dir_start[b - 1] as usize).clamp(start, end);
            end =
                group_start + self.slab.digits[group_start..end].partition_point(|&d| d <= digits);
        }
        start..end.max(start)
    }

    /// Ranges to scan for `disk`, each with its prefix slots and tail flag.
    pub fn cover(&self, disk: &Disk) -> Vec<CellRange<Place>> {
        cover_disk(disk, self.storage, self)
    }

    /// Calls `emit(slot)` for every device inside `disk` seen at or after `cutoff`
    /// (at least 1) in one range of its covering.
    pub fn scan_range(
        &self,
        disk: &Disk,
        range: &CellRange<Place>,
        cutoff: u32,
        mut emit: impl FnMut(usize),
    ) {
        debug_assert!(cutoff >= 1, "dead slots have seen == 0");
        let seen = &self.slab.seen;
        let positions = &self.slab.positions;
        let mut visit = |slot: usize| {
            if seen[slot] >= cutoff && (range.inside || disk.contains(&positions[slot])) {
                emit(slot);
            }
        };
        range.place.prefix.clone().for_each(&mut visit);
        if range.place.in_tail {
            for slots in self.tail_by_cell.range(range.first..=range.last).map(|(_, s)| s) {
                slots.iter().for_each(|&slot| visit(slot as usize));
            }
        }
    }

    /// Upper bound on the devices a range holds, to split work.
    pub fn range_size(&self, range: &CellRange<Place>) -> usize {
        let tail: usize = if range.place.in_tail {
            self.tail_by_cell.range(range.first..=range.last).map(|(_, s)| s.len()).sum()
        } else {
            0
        };
        range.place.prefix.len() + tail
    }

    /// Device id of a slot.
    #[inline]
    pub fn id(&self, slot: usize) -> u64 {
        self.slab.ids[slot]
    }

    /// Device key of a slot.
    #[inline]
    pub fn key(&self, slot: usize) -> DeviceKey {
        self.slab.key(slot as u32)
    }

    /// Every stored device with its position and last-seen second, in slot order (by
    /// cell for the sorted part), which makes a reload's sort nearly free. Dead slots
    /// (`seen == 0`) are skipped; every other slot is the one live slot of its device.
    pub fn for_each_device(&self, mut f: impl FnMut(DeviceKey, FixedVec, u32)) {
        for s in 0..self.slab.len() {
            let seen = self.slab.seen[s];
            if seen != 0 {
                f(self.slab.key(s as u32), self.slab.positions[s], seen);
            }
        }
    }
}

/// Checks the storage resolution option.
pub fn storage_resolution(value: u8) -> Result<Resolution, InputError> {
    match Resolution::try_from(value) {
        Ok(res) if (5..=13).contains(&value) => Ok(res),
        _ => Err(InputError::Option {
            name: "resolution",
            reason: format!("must be an H3 resolution from 5 to 13, got {value}"),
        }),
    }
}
