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
#[derive(Clone, Copy, Debug)]
pub struct Disk {
    /// Centre as a float64 unit vector.
    pub centre: [f64; 3],
    /// Centre rounded to fixed point exactly like a device at the same place, so a
    /// device reported at the centre is at distance zero (radius 0 finds it).
    pub centre_fixed: FixedVec,
    /// Radius as a central angle in radians.
    pub angle: f64,
    /// Squared chord of the radius in fixed-point units; `f64::INFINITY` when the disk
    /// is the whole sphere.
    chord2: f64,
}

impl Disk {
    /// Disk of `radius_m` metres around a latitude and longitude in degrees.
    pub fn new(lat_deg: f64, lng_deg: f64, radius_m: f64) -> Self {
        let angle = angle_of_metres(radius_m);
        let chord2 = if angle >= std::f64::consts::PI {
            f64::INFINITY
        } else {
            // chord = 2 sin(angle / 2), monotonic on [0, pi].
            let chord = 2.0 * (angle / 2.0).sin() * UNIT;
            chord * chord
        };
        Self {
            centre: unit_vector(lat_deg, lng_deg),
            centre_fixed: fixed_vector(lat_deg, lng_deg),
            angle,
            chord2,
        }
    }

    /// Whether a device at fixed-point position `p` lies inside the disk.
    #[inline(always)]
    pub fn contains(&self, p: &FixedVec) -> bool {
        // Differences of i32 are exact in i64 and in f64 (below 2^53).
        let dx = (i64::from(p[0]) - i64::from(self.centre_fixed[0])) as f64;
        let dy = (i64::from(p[1]) - i64::from(self.centre_fixed[1])) as f64;
        let dz = (i64::from(p[2]) - i64::from(self.centre_fixed[2])) as f64;
        dx * dx + dy * dy + dz * dz <= self.chord2
    }

    /// Whether the disk is the whole sphere.
    pub fn is_everything(&self) -> bool {
        self.chord2.is_infinite()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chord_test_agrees_with_haversine_away_from_the_boundary() {
        let places = [(0.0, 0.0), (89.99, 10.0), (-90.0, 0.0), (10.0, 179.999), (39.9, 116.4)];
        for &(lat, lng) in &places {
            for &radius in &[0.5, 10.0, 1000.0, 3000.0, 500_000.0, 19_000_000.0] {
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
