//! Covering a disk with H3 cells, coarse where the disk is solid, fine at its edge.
//!
//! Every device is filed under its H3 cell at the index's storage resolution, and the
//! store keeps devices sorted by that cell id. All storage-resolution descendants of a
//! coarser cell form one contiguous range of ids, so a covering of the disk by cells of
//! mixed resolutions becomes a short list of id ranges to scan.
//!
//! The covering descends the H3 hierarchy from the 122 base cells. Each cell is
//! classified with one angle from its centre and a per-resolution bound on how far
//! from that centre a device filed under one of its descendants can be:
//! - outside the disk: skipped;
//! - inside the disk: every device in its range answers, without a distance test;
//! - straddling: its children are classified in turn, unless the cell holds few
//!   devices or is at the storage resolution, where each device is tested.

use crate::geo::{angle_between, unit_vector, Disk};
use h3o::{CellIndex, LatLng, Resolution};
use std::sync::OnceLock;

/// Straddling cells holding at most this many devices are tested device by device
/// instead of being split: classifying seven children (their centres, ranges and
/// counts) costs about as much as testing a thousand positions. Measured on the 10M
/// metro population, 1024 beat 384 by 5 to 20 % at 1 and 3 km.
pub const SPLIT_ABOVE: usize = 1024;

/// Bound on the distance from a cell's centre to any point filed under one of its
/// descendants, as a multiple of the resolution's average edge length.
///
/// H3 children do not tile their parent exactly, so this is larger than the cell's own
/// circumradius. Sampling millions of points (uniform, and dense around all pentagons
/// of every resolution) gives at most 1.144 edge lengths at every resolution; the test
/// `descendants_stay_within_the_bound` checks it again on fresh points. The margin
/// above that costs a slightly wider band of tested devices, never an answer.
pub const DESCENDANT_REACH: f64 = 1.25;

/// Reach in radians of cells of each resolution (index = resolution).
fn reach(resolution: Resolution) -> f64 {
    DESCENDANT_REACH * resolution.edge_length_rads()
}

/// A range of storage cell ids `[first, last]`, whether every device in it is known to
/// be inside the disk, and where the store keeps its devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellRange<P> {
    pub first: u64,
    pub last: u64,
    pub inside: bool,
    pub place: P,
}

/// Where a store keeps the devices of a range of storage cells.
pub trait Locate {
    /// The store's answer: which slots, for instance.
    type Place: Clone;
    /// Where the devices filed in `[first, last]` are. `within` is the place of a
    /// range known to contain this one (`None` for base cells), to narrow the search.
    fn locate(&self, first: u64, last: u64, within: Option<&Self::Place>) -> Self::Place;
    /// Upper bound on the devices at a place (0 means none).
    fn count(&self, place: &Self::Place) -> usize;
}

/// First and last storage-resolution descendants of `cell` (inclusive).
pub fn descendant_range(cell: CellIndex, storage: Resolution) -> (u64, u64) {
    let count = cell.children_count(storage);
    // Centre child at every level has all digits 0: the smallest id of the range.
    let first = cell.center_child(storage).expect("storage resolution is finer");
    let last = cell.child_at(count - 1, storage).expect("position is below the count");
    (u64::from(first), u64::from(last))
}

fn base_cells() -> &'static [(CellIndex, [f64; 3])] {
    static BASE: OnceLock<Vec<(CellIndex, [f64; 3])>> = OnceLock::new();
    BASE.get_or_init(|| CellIndex::base_cells().map(|cell| (cell, centre(cell))).collect())
}

fn centre(cell: CellIndex) -> [f64; 3] {
    let ll = LatLng::from(cell);
    unit_vector(ll.lat(), ll.lng())
}

/// Ranges of storage cells that together hold every device inside `disk`, in no order.
///
/// Empty ranges are dropped and crowded straddling cells are split.
pub fn cover_disk<L: Locate>(
    disk: &Disk,
    storage: Resolution,
    store: &L,
) -> Vec<CellRange<L::Place>> {
    let mut out = Vec::new();
    let mut stack: Vec<(CellIndex, [f64; 3], Option<L::Place>)> =
        base_cells().iter().map(|&(cell, c)| (cell, c, None)).collect();
    while let Some((cell, c, parent)) = stack.pop() {
        let resolution = cell.resolution();
        let bound = reach(resolution);
        let distance = angle_between(&disk.centre, &c);
        if distance - bound > disk.angle {
            continue;
        }
        let (first, last) = descendant_range(cell, storage);
        let place = store.locate(first, last, parent.as_ref());
        let n = store.count(&place);
        if n == 0 {
            continue;
        }
        let inside = disk.is_everything() || distance + bound <= disk.angle;
        if inside || resolution == storage || n <= SPLIT_ABOVE {
            out.push(CellRange { first, last, inside, place });
            continue;
        }
        let finer = resolution.succ().expect("coarser than the storage resolution");
        stack.extend(cell.children(finer).map(|child| (child, centre(child), Some(place.clone()))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_point(rng: &mut impl Rng) -> (f64, f64) {
        let z: f64 = rng.random_range(-1.0..1.0);
        (z.asin().to_degrees(), rng.random_range(-180.0..180.0))
    }

    #[test]
    fn descendants_stay_within_the_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut points: Vec<(f64, f64)> = (0..20_000).map(|_| random_point(&mut rng)).collect();
        // Distortion is largest around the pentagons: sample them densely.
        for res in [0u8, 3, 7, 10] {
            let res = Resolution::try_from(res).unwrap();
            for pentagon in res.pentagons() {
                let ll = LatLng::from(pentagon);
                for _ in 0..200 {
                    let spread = 10f64.powf(rng.random_range(-5.0..1.0));
                    let lat = (ll.lat() + rng.random_range(-spread..spread)).clamp(-90.0, 90.0);
                    let lng =
                        (ll.lng() + rng.random_range(-spread..spread) + 540.0) % 360.0 - 180.0;
                    points.push((lat, lng));
                }
            }
        }
        for (lat, lng) in points {
            let p = unit_vector(lat, lng);
            let finest = LatLng::new(lat, lng).unwrap().to_cell(Resolution::Fifteen);
            for res in 0..15u8 {
                let res = Resolution::try_from(res).unwrap();
                let ancestor = finest.parent(res).unwrap();
                let ratio = angle_between(&p, &centre(ancestor)) / res.edge_length_rads();
                assert!(ratio < 1.16, "{lat},{lng} at {res}: {ratio}");
            }
        }
    }

    #[test]
    fn descendant_range_holds_exactly_the_descendants() {
        let cell = LatLng::new(39.9, 116.4).unwrap().to_cell(Resolution::Six);
        let (first, last) = descendant_range(cell, Resolution::Eight);
        let children: Vec<u64> = cell.children(Resolution::Eight).map(u64::from).collect();
        assert_eq!(children.len(), 49);
        assert_eq!(first, *children.iter().min().unwrap());
        assert_eq!(last, *children.iter().max().unwrap());
        let neighbour = cell.grid_disk::<Vec<_>>(1)[1];
        let (nf, nl) = descendant_range(neighbour, Resolution::Eight);
        assert!(nl < first || nf > last);
    }

    struct Everywhere;

    impl Locate for Everywhere {
        type Place = ();
        fn locate(&self, _: u64, _: u64, _: Option<&()>) {}
        fn count(&self, _: &()) -> usize {
            1
        }
    }

    #[test]
    fn covering_of_the_whole_sphere_is_the_base_cells() {
        let disk = Disk::new(0.0, 0.0, 2.1e7);
        let ranges = cover_disk(&disk, Resolution::Ten, &Everywhere);
        assert_eq!(ranges.len(), 122);
        assert!(ranges.iter().all(|r| r.inside));
    }
}
