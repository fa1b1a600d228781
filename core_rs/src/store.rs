//! The device store: live positions sorted by H3 cell, with in-place moves.
//!
//! Layout (26 bytes a device, plus about 6 to 11 in the key table):
//! - a slab of columns indexed by slot: device id, gateway, fixed-point position, and
//!   the second it was last seen (0 marks a dead slot);
//! - the *sorted prefix* of the slab, ordered by storage cell, with a directory of the
//!   cells present and where each one starts;
//! - the *appended tail*: devices that arrived or changed cell since the last
//!   compaction, with their cell, and an ordered map from cell to their slots;
//! - a key table from (gateway, device id) to slot, split in shards by hash so that a
//!   large batch is applied on every core.
//!
//! A report that keeps a device in its cell rewrites its slot in place. One that moves
//! it to another cell kills the old slot and appends a new one. When dead and appended
//! slots pile up, compaction merges the tail into the prefix in one pass.

use crate::cover::{cover_disk, CellRange};
use crate::error::InputError;
use crate::geo::{fixed_vector, Disk, FixedVec};
use h3o::{LatLng, Resolution};
use hashbrown::HashTable;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Number of key-table shards (a power of two).
const SHARDS: usize = 64;
/// Batches up to this size are applied on one thread: splitting costs more.
const PARALLEL_ABOVE: usize = 16_384;

/// Identity of a device: its partner app's gateway and the id that app gave it. Two
/// gateways may use the same id for different phones; they are different devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub gateway: u16,
    pub id: u64,
}

/// One location report, already checked.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub key: DeviceKey,
    pub lat: f64,
    pub lng: f64,
    /// Unix time in whole seconds, at least 1.
    pub seen: u32,
}

/// What a batch of reports did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpsertOutcome {
    /// Devices seen for the first time (or again after removal or expiry).
    pub added: usize,
    /// Known devices whose position was replaced.
    pub updated: usize,
    /// Reports older than what the index already holds for the device, or repeated in
    /// the batch with an older or equal time: ignored.
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
}

impl Slab {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn key(&self, slot: u32) -> DeviceKey {
        DeviceKey { gateway: self.gateways[slot as usize], id: self.ids[slot as usize] }
    }

    fn push(&mut self, key: DeviceKey, position: FixedVec, seen: u32) {
        self.ids.push(key.id);
        self.gateways.push(key.gateway);
        self.positions.push(position);
        self.seen.push(seen);
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
        }
    }

    fn bytes(&self) -> usize {
        self.ids.capacity() * 8
            + self.gateways.capacity() * 2
            + self.positions.capacity() * 12
            + self.seen.capacity() * 4
    }
}

/// Hash of the key, storage cell, and position of one report.
pub type Prepared = (u64, u64, FixedVec);

/// What one report does to the store, decided before anything changes.
#[derive(Clone, Copy)]
enum Action {
    Stale,
    InPlace(u32),
    Move(u32),
    New,
}

/// Live device positions filed by H3 cell, answering radius queries exactly.
pub struct Store {
    storage: Resolution,
    slab: Slab,
    /// Slots `[0, sorted_len)` are ordered by storage cell.
    sorted_len: usize,
    /// Distinct storage cells of the sorted prefix, ascending.
    dir_cells: Vec<u64>,
    /// `dir_start[i]..dir_start[i + 1]` are the slots of `dir_cells[i]`; one entry more
    /// than `dir_cells`, the last one `sorted_len`.
    dir_start: Vec<u32>,
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
            dir_cells: Vec::new(),
            dir_start: vec![0],
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
            + self.dir_cells.capacity() * 8
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
        self.shards[shard_of(hash)].find(hash, |&slot| slab.key(slot) == key).copied()
    }

    /// Storage cell a slot is filed under.
    fn cell_of(&self, slot: u32) -> u64 {
        let slot = slot as usize;
        if slot < self.sorted_len {
            // dir_start is ascending; the cell is the last one starting at or before.
            let i = self.dir_start.partition_point(|&start| start as usize <= slot) - 1;
            self.dir_cells[i]
        } else {
            self.tail_cells[slot - self.sorted_len]
        }
    }

    /// Hash, storage cell and fixed-point position of each report: the costly part of
    /// applying a batch, which needs no access to the store.
    pub fn prepare(storage: Resolution, reports: &[Report]) -> Vec<Prepared> {
        let prepare = |r: &Report| {
            let ll = LatLng::new(r.lat, r.lng).expect("reports are checked");
            (hash_key(r.key), u64::from(ll.to_cell(storage)), fixed_vector(r.lat, r.lng))
        };
        if reports.len() > PARALLEL_ABOVE {
            reports.par_iter().map(prepare).collect()
        } else {
            reports.iter().map(prepare).collect()
        }
    }

    /// Applies a batch of checked reports prepared by [`Store::prepare`] at this store's
    /// resolution. A report older than the stored position of its device is ignored;
    /// within the batch the newest report of a device wins (the later one on equal
    /// times).
    pub fn apply(&mut self, reports: &[Report], prepared: &[Prepared]) -> UpsertOutcome {
        assert_eq!(reports.len(), prepared.len());
        for r in reports {
            self.gateway_used[usize::from(r.key.gateway)] = true;
        }

        // Reports by shard, newest per device, in the order they are applied.
        let mut by_shard: Vec<Vec<u32>> = vec![Vec::new(); SHARDS];
        for (i, &(hash, _, _)) in prepared.iter().enumerate() {
            by_shard[shard_of(hash)].push(i as u32);
        }
        let mut outcome = UpsertOutcome::default();
        let dedup = |list: &mut Vec<u32>| -> usize {
            list.sort_unstable_by_key(|&i| (prepared[i as usize].0, i));
            let before = list.len();
            let mut kept: Vec<u32> = Vec::with_capacity(before);
            for &i in list.iter() {
                let r = &reports[i as usize];
                // Equal keys have equal hashes, so they are neighbours after the sort
                // unless another key shares the hash; look back over the run.
                let hash = prepared[i as usize].0;
                let mut replaced = false;
                for k in kept.iter_mut().rev() {
                    if prepared[*k as usize].0 != hash {
                        break;
                    }
                    if reports[*k as usize].key == r.key {
                        if r.seen >= reports[*k as usize].seen {
                            *k = i;
                        }
                        replaced = true;
                        break;
                    }
                }
                if !replaced {
                    kept.push(i);
                }
            }
            *list = kept;
            before - list.len()
        };
        outcome.stale += by_shard.par_iter_mut().map(dedup).sum::<usize>();

        // Decide what each report does while the store is unchanged.
        let decide = |list: &Vec<u32>| -> Vec<Action> {
            list.iter()
                .map(|&i| {
                    let (hash, cell, _) = prepared[i as usize];
                    let r = &reports[i as usize];
                    match self.find(hash, r.key) {
                        None => Action::New,
                        Some(slot) if r.seen < self.slab.seen[slot as usize] => Action::Stale,
                        Some(slot) if self.cell_of(slot) == cell => Action::InPlace(slot),
                        Some(slot) => Action::Move(slot),
                    }
                })
                .collect()
        };
        let actions: Vec<Vec<Action>> = if reports.len() > PARALLEL_ABOVE {
            by_shard.par_iter().map(decide).collect()
        } else {
            by_shard.iter().map(decide).collect()
        };

        // Write the slab: in-place rewrites, dead slots, and appended slots.
        let mut new_slots: Vec<Vec<(u32, u32)>> = vec![Vec::new(); SHARDS];
        for (shard, (list, acts)) in by_shard.iter().zip(&actions).enumerate() {
            for (&i, action) in list.iter().zip(acts) {
                let r = &reports[i as usize];
                let (_, cell, position) = prepared[i as usize];
                match *action {
                    Action::Stale => outcome.stale += 1,
                    Action::InPlace(slot) => {
                        self.slab.positions[slot as usize] = position;
                        self.slab.seen[slot as usize] = r.seen;
                        outcome.updated += 1;
                    }
                    Action::Move(_) | Action::New => {
                        if let Action::Move(old) = *action {
                            self.slab.seen[old as usize] = 0;
                            self.dead += 1;
                            outcome.updated += 1;
                        } else {
                            outcome.added += 1;
                        }
                        let slot = self.slab.len() as u32;
                        self.slab.push(r.key, position, r.seen);
                        self.tail_cells.push(cell);
                        new_slots[shard].push((i, slot));
                    }
                }
                self.oldest_seen = self.oldest_seen.min(r.seen);
            }
        }
        self.stored += outcome.added;

        // Point the key table at the appended slots, shard by shard.
        let slab = &self.slab;
        let relink = |(table, ((list, acts), fresh)): (
            &mut HashTable<u32>,
            ((&Vec<u32>, &Vec<Action>), &Vec<(u32, u32)>),
        )| {
            let rehash = |&s: &u32| hash_key(slab.key(s));
            let added = acts.iter().filter(|a| matches!(a, Action::New)).count();
            table.reserve(added, rehash);
            let mut fresh = fresh.iter();
            for (&i, action) in list.iter().zip(acts) {
                let hash = prepared[i as usize].0;
                match *action {
                    Action::Move(old) => {
                        let &(_, slot) = fresh.next().expect("one new slot per move");
                        let entry = table.find_mut(hash, |&s| s == old).expect("moved device");
                        *entry = slot;
                    }
                    Action::New => {
                        let &(_, slot) = fresh.next().expect("one new slot per new device");
                        table.insert_unique(hash, slot, rehash);
                    }
                    Action::Stale | Action::InPlace(_) => {}
                }
            }
        };
        if reports.len() > PARALLEL_ABOVE {
            let work = by_shard.par_iter().zip(actions.par_iter()).zip(new_slots.par_iter());
            self.shards.par_iter_mut().zip(work).for_each(relink);
        } else {
            let work = by_shard.iter().zip(&actions).zip(&new_slots);
            self.shards.iter_mut().zip(work).for_each(relink);
        }

        // Index the tail by cell, or fold it into the prefix when it has grown.
        let tail = self.tail_len();
        if tail + self.dead > (self.sorted_len / 8).max(65_536) {
            self.compact();
        } else {
            let start = self.sorted_len;
            for list in &new_slots {
                for &(_, slot) in list {
                    let cell = self.tail_cells[slot as usize - start];
                    self.tail_by_cell.entry(cell).or_default().push(slot);
                }
            }
        }
        outcome
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

    fn compact_if_worth_it(&mut self) {
        if self.tail_len() + self.dead > (self.sorted_len / 8).max(65_536) {
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

        // Merge prefix and tail cell by cell into the new order and directory.
        let live = self.stored;
        let mut order: Vec<u32> = Vec::with_capacity(live);
        let mut dir_cells = Vec::with_capacity(self.dir_cells.len() + tail.len().min(1 << 20));
        let mut dir_start = Vec::with_capacity(dir_cells.capacity() + 1);
        let mut t = 0;
        let mut d = 0;
        let seen = &self.slab.seen;
        while d < self.dir_cells.len() || t < tail.len() {
            let dir_cell = self.dir_cells.get(d).copied().unwrap_or(u64::MAX);
            let tail_cell = tail.get(t).map_or(u64::MAX, |&(c, _)| c);
            let cell = dir_cell.min(tail_cell);
            let before = order.len();
            if dir_cell == cell {
                let range = self.dir_start[d]..self.dir_start[d + 1];
                order.extend(range.filter(|&slot| seen[slot as usize] != 0));
                d += 1;
            }
            while t < tail.len() && tail[t].0 == cell {
                order.push(tail[t].1);
                t += 1;
            }
            if order.len() > before {
                dir_cells.push(cell);
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
        dir_cells.shrink_to_fit();
        dir_start.shrink_to_fit();
        self.dir_cells = dir_cells;
        self.dir_start = dir_start;
        self.tail_cells = Vec::new();
        self.tail_by_cell = BTreeMap::new();
        self.dead = 0;
    }

    /// Slots of the sorted prefix filed in storage cells `[first, last]`.
    fn prefix_slots(&self, first: u64, last: u64) -> std::ops::Range<usize> {
        let a = self.dir_cells.partition_point(|&c| c < first);
        let b = a + self.dir_cells[a..].partition_point(|&c| c <= last);
        self.dir_start[a] as usize..self.dir_start[b] as usize
    }

    /// Upper bound on the devices filed in storage cells `[first, last]`.
    fn count(&self, first: u64, last: u64) -> usize {
        let prefix = self.prefix_slots(first, last).len();
        let tail = self.tail_by_cell.range(first..=last).next().is_some();
        prefix + usize::from(tail)
    }

    /// Cell ranges to scan for `disk`.
    pub fn cover(&self, disk: &Disk) -> Vec<CellRange> {
        cover_disk(disk, self.storage, |first, last| self.count(first, last))
    }

    /// Calls `emit(slot)` for every device inside `disk` seen at or after `cutoff`
    /// (at least 1) in one range of its covering.
    pub fn scan_range(
        &self,
        disk: &Disk,
        range: &CellRange,
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
        self.prefix_slots(range.first, range.last).for_each(&mut visit);
        for slots in self.tail_by_cell.range(range.first..=range.last).map(|(_, s)| s) {
            slots.iter().for_each(|&slot| visit(slot as usize));
        }
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

    /// Upper bound on the devices a range holds, to split work.
    pub fn range_size(&self, range: &CellRange) -> usize {
        let tail: usize =
            self.tail_by_cell.range(range.first..=range.last).map(|(_, s)| s.len()).sum();
        self.prefix_slots(range.first, range.last).len() + tail
    }

    /// Every stored device: key, latitude, longitude in degrees, seen (for snapshots).
    pub fn for_each_device(&self, mut f: impl FnMut(DeviceKey, FixedVec, u32)) {
        for table in &self.shards {
            for &slot in table.iter() {
                let s = slot as usize;
                f(self.slab.key(slot), self.slab.positions[s], self.slab.seen[s]);
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
