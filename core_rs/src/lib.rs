//! Live device locations on H3, exact radius queries, and per-alert recipient dedup.
//!
//! [`LocationIndex`] is the thread-safe entry point: reports go in through
//! [`LocationIndex::upsert`], rings come out of [`LocationIndex::within`] and
//! [`LocationIndex::new_recipients`]. Queries share a read lock and run beside each
//! other; a batch of reports is prepared (cells, positions, hashes) without any lock
//! and applied under the write lock, so a reader sees a batch entirely or not at all.

#[cfg(target_os = "linux")]
mod alloc;
pub mod cover;
pub mod error;
pub mod geo;
pub mod store;

#[cfg(feature = "python")]
mod python;

use error::{check_all, InputError};
use geo::Disk;
use hashbrown::{HashMap, HashSet};
use parking_lot::{Mutex, RwLock, RwLockUpgradableReadGuard};
use rayon::prelude::*;
use std::collections::BTreeMap;
use store::{Batch, DeviceKey, Store, UpsertOutcome};

pub use geo::{haversine_m, EARTH_RADIUS_M};

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: alloc::HugePageAlloc = alloc::HugePageAlloc;

/// How far in the future a report's time may be (clock skew between the partner
/// app's servers and the engine), in seconds.
pub const MAX_FUTURE_S: f64 = 300.0;

/// Queries whose covering holds more devices than this are scanned on every core.
const PARALLEL_SCAN_ABOVE: usize = 262_144;

/// Shards of one gateway's set in an [`AlertRecord`]: large sweeps insert into them on
/// every core.
const RECORD_SHARDS: usize = 16;

/// Inserts of fewer devices than this stay on one thread.
const PARALLEL_RECORD_ABOVE: usize = 65_536;

/// The shard of an id: the top bits of a multiplicative hash, so that ids allotted in
/// sequence still spread evenly.
fn record_shard(id: u64) -> usize {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize
}

/// One gateway's recorded ids, split in [`RECORD_SHARDS`] sets.
type Shards = Vec<HashSet<u64>>;

fn new_shards() -> Shards {
    vec![HashSet::new(); RECORD_SHARDS]
}

/// Devices notified for one alert, by gateway: nobody is notified twice.
#[derive(Default)]
pub struct AlertRecord {
    notified: Mutex<HashMap<u16, Shards>>,
}

impl AlertRecord {
    pub fn new() -> Self {
        Self::default()
    }

    /// Devices recorded.
    pub fn len(&self) -> usize {
        self.notified.lock().values().flatten().map(HashSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records devices as notified (restoring a record, or devices notified by other
    /// means). Returns how many were not recorded yet.
    pub fn add(&self, gateway: u16, ids: &[u64]) -> usize {
        let keys: Vec<DeviceKey> = ids.iter().map(|&id| DeviceKey { gateway, id }).collect();
        self.insert(&keys).values().map(Vec::len).sum()
    }

    /// Records devices as notified and returns those that were not recorded yet, in
    /// the order given (a repeated id is returned once).
    pub fn add_new(&self, gateway: u16, ids: &[u64]) -> Vec<u64> {
        let mut notified = self.notified.lock();
        let shards = notified.entry(gateway).or_insert_with(new_shards);
        ids.iter().copied().filter(|&id| shards[record_shard(id)].insert(id)).collect()
    }

    /// Records devices as notified and returns, by gateway, those that were not recorded
    /// yet (each once, in no particular order). Large inputs are inserted on every core,
    /// one shard a task.
    fn insert(&self, keys: &[DeviceKey]) -> BTreeMap<u16, Vec<u64>> {
        let mut notified = self.notified.lock();
        let mut out: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
        if keys.len() <= PARALLEL_RECORD_ABOVE {
            for key in keys {
                let shards = notified.entry(key.gateway).or_insert_with(new_shards);
                if shards[record_shard(key.id)].insert(key.id) {
                    out.entry(key.gateway).or_default().push(key.id);
                }
            }
            return out;
        }

        // Bucket by gateway and shard, then give each task one set and its bucket.
        let mut buckets: HashMap<u16, Vec<Vec<u64>>> = HashMap::new();
        for key in keys {
            let shard = record_shard(key.id);
            buckets.entry(key.gateway).or_insert_with(|| vec![Vec::new(); RECORD_SHARDS])[shard]
                .push(key.id);
        }
        for &gateway in buckets.keys() {
            notified.entry(gateway).or_insert_with(new_shards);
        }
        let mut work: Vec<(u16, &mut HashSet<u64>, Vec<u64>)> = Vec::new();
        for (&gateway, shards) in notified.iter_mut() {
            if let Some(bucket) = buckets.get_mut(&gateway) {
                for (set, ids) in shards.iter_mut().zip(bucket.iter_mut()) {
                    work.push((gateway, set, std::mem::take(ids)));
                }
            }
        }
        let inserted: Vec<(u16, Vec<u64>)> = work
            .into_par_iter()
            .map(|(gateway, set, ids)| {
                set.reserve(ids.len());
                (gateway, ids.into_iter().filter(|&id| set.insert(id)).collect())
            })
            .collect();
        for (gateway, ids) in inserted {
            if !ids.is_empty() {
                out.entry(gateway).or_default().extend(ids);
            }
        }
        out
    }

    /// Whether a device is recorded.
    pub fn contains(&self, gateway: u16, id: u64) -> bool {
        self.notified
            .lock()
            .get(&gateway)
            .is_some_and(|shards| shards[record_shard(id)].contains(&id))
    }

    /// Recorded ids of one gateway, ascending.
    pub fn ids(&self, gateway: u16) -> Vec<u64> {
        let notified = self.notified.lock();
        let mut ids: Vec<u64> = notified
            .get(&gateway)
            .map(|shards| shards.iter().flatten().copied().collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    /// Gateways with at least one recorded device, ascending.
    pub fn gateways(&self) -> Vec<u16> {
        let notified = self.notified.lock();
        let mut gateways: Vec<u16> = notified
            .iter()
            .filter(|(_, shards)| shards.iter().any(|set| !set.is_empty()))
            .map(|(&g, _)| g)
            .collect();
        gateways.sort_unstable();
        gateways
    }
}

/// Checks the engine's clock reading.
fn check_now(now: f64) -> Result<(), InputError> {
    if now.is_finite() && now >= 0.0 {
        return Ok(());
    }
    Err(InputError::Scalar {
        name: "now",
        reason: "must be a finite Unix time in seconds",
        value: now,
    })
}

/// Checks latitudes and longitudes in degrees.
fn check_coordinates(lat: &[f64], lng: &[f64]) -> Result<(), InputError> {
    check_all("lat", lat, "are not finite degrees within [-90, 90]", |v| {
        (-90.0..=90.0).contains(&v)
    })?;
    check_all("lng", lng, "are not finite degrees within [-180, 180]", |v| {
        (-180.0..=180.0).contains(&v)
    })
}

/// Checks one query centre and radius.
fn check_disk(lat: f64, lng: f64, radius_m: f64) -> Result<Disk, InputError> {
    if !(-90.0..=90.0).contains(&lat) {
        return Err(InputError::Scalar {
            name: "lat",
            reason: "must be within [-90, 90] degrees",
            value: lat,
        });
    }
    if !(-180.0..=180.0).contains(&lng) {
        return Err(InputError::Scalar {
            name: "lng",
            reason: "must be within [-180, 180] degrees",
            value: lng,
        });
    }
    check_radius(radius_m)?;
    Ok(Disk::new(lat, lng, radius_m))
}

/// Checks a ring radius in metres.
fn check_radius(radius_m: f64) -> Result<(), InputError> {
    if radius_m >= 0.0 && radius_m.is_finite() {
        return Ok(());
    }
    Err(InputError::Scalar {
        name: "radius_m",
        reason: "must be a finite number of metres, 0 or more",
        value: radius_m,
    })
}

/// The live location index.
pub struct LocationIndex {
    store: RwLock<Store>,
    ttl_s: u32,
}

impl LocationIndex {
    /// An empty index filing devices at H3 `resolution`, forgetting a device `ttl_s`
    /// seconds after its last report.
    pub fn new(resolution: u8, ttl_s: u32) -> Result<Self, InputError> {
        let storage = store::storage_resolution(resolution)?;
        if ttl_s == 0 {
            return Err(InputError::Option {
                name: "ttl_s",
                reason: "must be at least 1 second".into(),
            });
        }
        Ok(Self { store: RwLock::new(Store::new(storage)), ttl_s })
    }

    pub fn ttl_s(&self) -> u32 {
        self.ttl_s
    }

    pub fn resolution(&self) -> u8 {
        self.store.read().storage_resolution().into()
    }

    /// First second at which a report is still live at `now` (never 0: dead slots).
    fn cutoff(&self, now: f64) -> Result<u32, InputError> {
        check_now(now)?;
        Ok((now - f64::from(self.ttl_s)).ceil().clamp(1.0, f64::from(u32::MAX)) as u32)
    }

    /// Applies location reports: one value per device in `ids`, `lat`, `lng` and `seen`
    /// (Unix seconds), and in `gateways` either one value per device or one for all.
    /// Checks everything first: on an error nothing changes.
    pub fn upsert(
        &self,
        ids: &[u64],
        gateways: &[u16],
        lat: &[f64],
        lng: &[f64],
        seen: &[f64],
        now: f64,
    ) -> Result<UpsertOutcome, InputError> {
        let n = ids.len();
        for (name, got) in [("lat", lat.len()), ("lng", lng.len()), ("seen_at", seen.len())] {
            if got != n {
                return Err(InputError::Length { name, got, expected: n });
            }
        }
        if gateways.len() != n && gateways.len() != 1 {
            return Err(InputError::Length { name: "gateway", got: gateways.len(), expected: n });
        }
        check_now(now)?;
        check_coordinates(lat, lng)?;
        check_all("seen_at", seen, "are not Unix times in seconds from 1 to 2^32 - 1", |v| {
            (1.0..4_294_967_296.0).contains(&v)
        })?;
        let latest = now + MAX_FUTURE_S;
        check_all("seen_at", seen, "are more than 300 s ahead of the engine's clock", |v| {
            v <= latest
        })?;

        let batch = Batch { ids, gateways, lat, lng, seen };
        // Cells and positions need no lock; locating the devices needs the store to hold
        // still, but queries may go on; only writing shuts them out.
        let storage = self.store.read().storage_resolution();
        let prepared = Store::prepare(storage, &batch);
        let cutoff = self.cutoff(now)?;
        let store = self.store.upgradable_read();
        let located = store.locate(&batch, &prepared);
        let mut store = RwLockUpgradableReadGuard::upgrade(store);
        Ok(store.apply(&batch, &prepared, &located, cutoff))
    }

    /// The positions the index holds for devices (`gateways` one per id, or one for
    /// all): latitude and longitude in degrees, NaN for a device not held or expired at
    /// `now`. This is where a batch of reports left each device, whatever order or age
    /// the reports had.
    pub fn positions(
        &self,
        ids: &[u64],
        gateways: &[u16],
        now: f64,
    ) -> Result<(Vec<f64>, Vec<f64>), InputError> {
        if gateways.len() != ids.len() && gateways.len() != 1 {
            return Err(InputError::Length {
                name: "gateway",
                got: gateways.len(),
                expected: ids.len(),
            });
        }
        let cutoff = self.cutoff(now)?;
        let store = self.store.read();
        let (mut lat, mut lng) = (vec![f64::NAN; ids.len()], vec![f64::NAN; ids.len()]);
        for (i, &id) in ids.iter().enumerate() {
            let gateway = if gateways.len() == 1 { gateways[0] } else { gateways[i] };
            if let Some((position, seen)) = store.position_of(DeviceKey { gateway, id }) {
                if seen >= cutoff {
                    (lat[i], lng[i]) = geo::fixed_to_latlng(position);
                }
            }
        }
        Ok((lat, lng))
    }

    /// Forgets devices now. Without `gateways`, an id is forgotten on every gateway
    /// that holds it. Returns how many devices were forgotten.
    pub fn remove(&self, ids: &[u64], gateways: Option<&[u16]>) -> Result<usize, InputError> {
        let mut store = self.store.write();
        let keys: Vec<DeviceKey> = match gateways {
            Some(g) if g.len() == 1 => {
                ids.iter().map(|&id| DeviceKey { gateway: g[0], id }).collect()
            }
            Some(g) if g.len() == ids.len() => {
                ids.iter().zip(g).map(|(&id, &gateway)| DeviceKey { gateway, id }).collect()
            }
            Some(g) => {
                return Err(InputError::Length {
                    name: "gateway",
                    got: g.len(),
                    expected: ids.len(),
                })
            }
            None => {
                let known = store.gateways();
                ids.iter().flat_map(|&id| store.gateways_of(id, &known)).collect()
            }
        };
        Ok(store.remove(&keys))
    }

    /// Drops devices whose last report is older than the time-to-live. Returns how many.
    pub fn expire(&self, now: f64) -> Result<usize, InputError> {
        let cutoff = self.cutoff(now)?;
        Ok(self.store.write().expire(cutoff))
    }

    /// Live devices at `now` (drops the expired ones first).
    pub fn live(&self, now: f64) -> Result<usize, InputError> {
        let cutoff = self.cutoff(now)?;
        if let Some(n) = self.store.read().live_if_none_expired(cutoff) {
            return Ok(n);
        }
        Ok(self.store.write().live(cutoff))
    }

    /// Bytes of memory the index holds.
    pub fn memory_bytes(&self) -> usize {
        self.store.read().bytes()
    }

    /// Folds recent moves into the sorted part now (normally automatic).
    pub fn compact(&self) {
        self.store.write().compact();
    }

    /// Collects `f(store, slot)` for every live device inside `disk`.
    fn collect<T: Copy + Send + Sync>(
        store: &Store,
        disk: &Disk,
        cutoff: u32,
        f: impl Fn(&Store, usize) -> T + Sync,
    ) -> Vec<T> {
        let ranges = store.cover(disk);
        let sizes: Vec<usize> = ranges.iter().map(|r| store.range_size(r)).collect();
        let total: usize = sizes.iter().sum();
        if total <= PARALLEL_SCAN_ABOVE {
            // `total` bounds the answer: one allocation, no regrowth.
            let mut out = Vec::with_capacity(total);
            for range in &ranges {
                store.scan_range(disk, range, cutoff, |slot| out.push(f(store, slot)));
            }
            return out;
        }
        let parts: Vec<Vec<T>> = ranges
            .par_iter()
            .zip(sizes.par_iter())
            .map(|(range, &size)| {
                let mut part = Vec::with_capacity(size);
                store.scan_range(disk, range, cutoff, |slot| part.push(f(store, slot)));
                part
            })
            .collect();
        // Copy the parts into one vector on every core: at hundreds of megabytes, one
        // thread copying them costs as much as the scan itself.
        let total: usize = parts.iter().map(Vec::len).sum();
        let mut out: Vec<T> = Vec::with_capacity(total);
        let mut rest = &mut out.spare_capacity_mut()[..total];
        let mut slices = Vec::with_capacity(parts.len());
        for part in &parts {
            let (slice, after) = rest.split_at_mut(part.len());
            slices.push(slice);
            rest = after;
        }
        slices.into_par_iter().zip(parts.par_iter()).for_each(|(slice, part)| {
            for (dst, &src) in slice.iter_mut().zip(part) {
                dst.write(src);
            }
        });
        // SAFETY: the slices tile the first `total` spare elements, and each was written
        // in full from a part of the same length.
        unsafe { out.set_len(total) };
        out
    }

    /// Ids of the live devices within `radius_m` metres (great circle) of a centre in
    /// degrees, in no particular order. An id used by two gateways for two devices
    /// inside the disk appears twice; see [`LocationIndex::within_keys`].
    pub fn within(
        &self,
        lat: f64,
        lng: f64,
        radius_m: f64,
        now: f64,
    ) -> Result<Vec<u64>, InputError> {
        let disk = check_disk(lat, lng, radius_m)?;
        let store = self.store.read();
        Ok(Self::collect(&store, &disk, self.cutoff(now)?, |s, slot| s.id(slot)))
    }

    /// Gateway and id of the live devices within `radius_m` metres of a centre.
    pub fn within_keys(
        &self,
        lat: f64,
        lng: f64,
        radius_m: f64,
        now: f64,
    ) -> Result<Vec<DeviceKey>, InputError> {
        let disk = check_disk(lat, lng, radius_m)?;
        let store = self.store.read();
        Ok(Self::collect(&store, &disk, self.cutoff(now)?, |s, slot| s.key(slot)))
    }

    /// The live devices within `radius_m` metres of any of the centres that `record`
    /// does not hold yet, by gateway; they are added to `record` in the same pass, so
    /// concurrent calls never return a device twice.
    pub fn new_recipients(
        &self,
        record: &AlertRecord,
        centres: &[(f64, f64)],
        radius_m: f64,
        now: f64,
    ) -> Result<BTreeMap<u16, Vec<u64>>, InputError> {
        let lats: Vec<f64> = centres.iter().map(|c| c.0).collect();
        let lngs: Vec<f64> = centres.iter().map(|c| c.1).collect();
        check_coordinates(&lats, &lngs)?;
        check_radius(radius_m)?;
        let disks: Vec<Disk> =
            centres.iter().map(|&(lat, lng)| Disk::new(lat, lng, radius_m)).collect();
        let cutoff = self.cutoff(now)?;
        let store = self.store.read();
        let mut keys = Vec::new();
        for disk in &disks {
            keys.extend(Self::collect(&store, disk, cutoff, |s, slot| s.key(slot)));
        }
        Ok(record.insert(&keys))
    }

    /// Every stored device: gateway, id, latitude and longitude in degrees, and the
    /// second it was last seen.
    pub fn devices(&self) -> Vec<(DeviceKey, f64, f64, u32)> {
        let store = self.store.read();
        let mut out = Vec::with_capacity(store.stored());
        store.for_each_device(|key, position, seen| {
            let (lat, lng) = geo::fixed_to_latlng(position);
            out.push((key, lat, lng, seen));
        });
        out
    }
}
