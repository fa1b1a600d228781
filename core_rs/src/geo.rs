//! Sphere geometry: positions as fixed-point unit vectors and radius tests as chord tests.
//!
//! A device position is stored as the unit vector of its latitude and longitude, each
//! component scaled by `2^30` and rounded to `i32`: 12 bytes, 6 mm resolution on the
//! Earth's surface, everywhere (poles and antimeridian included). Comparing the
//! straight-line (chord) distance between two unit vectors with the chord of the radius
//! is equivalent to comparing great-circle distances, and costs three subtractions and
//! three multiplications instead of the haversine's trigonometry.

/// Mean Earth radius in metres (IUGG), the radius every distance in the engine uses.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Scale of the fixed-point unit-vector components.
pub const UNIT: f64 = (1u64 << 30) as f64;

/// A position on the unit sphere in fixed point (components times [`UNIT`]).
pub type FixedVec = [i32; 3];

/// Unit vector of a latitude and longitude in degrees, in float64.
#[inline]
pub fn unit_vector(lat_deg: f64, lng_deg: f64) -> [f64; 3] {
    let (sin_lat, cos_lat) = lat_deg.to_radians().sin_cos();
    let (sin_lng, cos_lng) = lng_deg.to_radians().sin_cos();
    [cos_lat * cos_lng, cos_lat * sin_lng, sin_lat]
}

/// Fixed-point unit vector of a latitude and longitude in degrees.
#[inline]
pub fn fixed_vector(lat_deg: f64, lng_deg: f64) -> FixedVec {
    let v = unit_vector(lat_deg, lng_deg);
    // |component| <= 1, so the rounded value fits in i32 with a bit to spare.
    [(v[0] * UNIT).round() as i32, (v[1] * UNIT).round() as i32, (v[2] * UNIT).round() as i32]
}

/// Latitude and longitude in degrees of a fixed-point unit vector (within 1 cm).
pub fn fixed_to_latlng(v: FixedVec) -> (f64, f64) {
    let (x, y, z) = (f64::from(v[0]), f64::from(v[1]), f64::from(v[2]));
    let lat = z.atan2(x.hypot(y)).to_degrees();
    let lng = y.atan2(x).to_degrees();
    (lat, lng)
}

/// Central angle in radians of a great-circle distance in metres.
#[inline]
pub fn angle_of_metres(metres: f64) -> f64 {
    metres / EARTH_RADIUS_M
}

/// Angle in radians between two unit vectors (numerically stable at 0 and at pi).
#[inline]
pub fn angle_between(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let cross = [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
    let sin = (cross[0] * cross[0] + cross[1] * cross[1] + cross[2] * cross[2]).sqrt();
    let cos = a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    sin.atan2(cos)
}

/// Great-circle distance in metres by the haversine formula (the reference for tests).
pub fn haversine_m(lat1: f64, lng1: f64, lat2: f64, lng2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lng2 - lng1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * a.sqrt().min(1.0).asin()
}

/// A disk on the sphere, ready for per-device tests in fixed point.
///
/// The chord of an angle near pi barely changes with the angle (its slope is
/// `cos(angle / 2)`), so at fixed-point resolution it cannot place a boundary near the
/// far side of the Earth. A disk wider than a hemisphere is therefore tested from the
/// antipode of its centre: a point is inside when its chord to the antipode is at least
/// the chord of `pi - angle`, where the chord is precise again.
#[derive(Clone, Copy, Debug)]
pub struct Disk {
    /// Centre as a float64 unit vector.
    pub centre: [f64; 3],
    /// Radius as a central angle in radians.
    pub angle: f64,
    /// The point chords are measured from: the centre rounded to fixed point exactly
    /// like a device at the same place (so radius 0 finds a device at the centre), or
    /// its antipode for disks wider than a hemisphere.
    pivot: FixedVec,
    /// Squared chord of the boundary from the pivot, in fixed-point units.
    boundary2: f64,
    /// +1 when inside means within `boundary2` of the pivot, -1 when it means beyond.
    side: f64,
    /// The disk covers the whole sphere.
    everything: bool,
}

/// Squared chord, in fixed-point units, of a central angle within [0, pi].
fn chord2(angle: f64) -> f64 {
    let chord = 2.0 * (angle / 2.0).sin() * UNIT;
    chord * chord
}

impl Disk {
    /// Disk of `radius_m` metres around a latitude and longitude in degrees.
    pub fn new(lat_deg: f64, lng_deg: f64, radius_m: f64) -> Self {
        use std::f64::consts::{FRAC_PI_2, PI};
        let angle = angle_of_metres(radius_m);
        let centre_fixed = fixed_vector(lat_deg, lng_deg);
        let (pivot, boundary2, side) = if angle <= FRAC_PI_2 {
            (centre_fixed, chord2(angle), 1.0)
        } else {
            let antipode = [-centre_fixed[0], -centre_fixed[1], -centre_fixed[2]];
            (antipode, chord2((PI - angle).max(0.0)), -1.0)
        };
        Self {
            centre: unit_vector(lat_deg, lng_deg),
            angle,
            pivot,
            boundary2,
            side,
            everything: angle >= PI,
        }
    }

    /// Whether a device at fixed-point position `p` lies inside the disk.
    #[inline(always)]
    pub fn contains(&self, p: &FixedVec) -> bool {
        // Differences of i32 are exact in i64 and in f64 (below 2^53).
        let dx = (i64::from(p[0]) - i64::from(self.pivot[0])) as f64;
        let dy = (i64::from(p[1]) - i64::from(self.pivot[1])) as f64;
        let dz = (i64::from(p[2]) - i64::from(self.pivot[2])) as f64;
        self.everything || self.side * (dx * dx + dy * dy + dz * dz - self.boundary2) <= 0.0
    }

    /// Whether the disk is the whole sphere.
    pub fn is_everything(&self) -> bool {
        self.everything
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_test_agrees_with_haversine_away_from_the_boundary() {
        let places = [(0.0, 0.0), (89.99, 10.0), (-90.0, 0.0), (10.0, 179.999), (39.9, 116.4)];
        for &(lat, lng) in &places {
            for &radius in &[0.5, 10.0, 1000.0, 3000.0, 500_000.0, 1.2e7, 19_000_000.0, 2.0e7] {
                let disk = Disk::new(lat, lng, radius);
                for k in 0..200 {
                    let dlat = ((k * 37) % 200) as f64 / 100.0 - 1.0;
                    let dlng = ((k * 91) % 200) as f64 / 100.0 - 1.0;
                    let scale = radius / 100_000.0;
                    let (plat, plng) =
                        ((lat + dlat * scale).clamp(-90.0, 90.0), lng + dlng * scale);
                    let plng = if plng > 180.0 { plng - 360.0 } else { plng };
                    let d = haversine_m(lat, lng, plat, plng);
                    if (d - radius).abs() > 0.05 {
                        assert_eq!(disk.contains(&fixed_vector(plat, plng)), d <= radius);
                    }
                }
            }
        }
    }

    #[test]
    fn boundaries_near_the_antipode_are_placed_to_the_metre() {
        use std::f64::consts::PI;
        // A device 60 m from the far side of the Earth, rings ending 2 m either side.
        let (lat, lng) = (0.0, 180.0 - 60.0 / EARTH_RADIUS_M * 180.0 / PI);
        let d = haversine_m(0.0, 0.0, lat, lng);
        let p = fixed_vector(lat, lng);
        assert!(Disk::new(0.0, 0.0, d + 2.0).contains(&p));
        assert!(!Disk::new(0.0, 0.0, d - 2.0).contains(&p));
        assert!(Disk::new(0.0, 0.0, PI * EARTH_RADIUS_M).contains(&fixed_vector(0.0, 180.0)));
    }

    #[test]
    fn a_device_at_the_centre_is_inside_radius_zero() {
        let disk = Disk::new(31.2304, 121.4737, 0.0);
        assert!(disk.contains(&fixed_vector(31.2304, 121.4737)));
        assert!(!disk.contains(&fixed_vector(31.2305, 121.4737)));
    }

    #[test]
    fn fixed_point_round_trip_is_within_a_centimetre() {
        for &(lat, lng) in &[(0.0, 0.0), (45.0, -179.9999), (-89.9999, 3.0), (90.0, 0.0)] {
            let (la, ln) = fixed_to_latlng(fixed_vector(lat, lng));
            assert!(haversine_m(lat, lng, la, ln) < 0.01);
        }
    }
}
