//! The index against a brute-force haversine oracle.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use tuanyuan_core::store::DeviceKey;
use tuanyuan_core::{haversine_m, AlertRecord, LocationIndex};

const NOW: f64 = 1_800_000_000.0;

/// What the index should hold: key -> (lat, lng, seen).
type Truth = BTreeMap<DeviceKey, (f64, f64, f64)>;

fn oracle(
    truth: &Truth,
    lat: f64,
    lng: f64,
    radius: f64,
    cutoff: f64,
) -> (BTreeSet<DeviceKey>, BTreeSet<DeviceKey>) {
    // Devices clearly inside, and devices within a metre of the boundary (either answer).
    let mut inside = BTreeSet::new();
    let mut edge = BTreeSet::new();
    for (&key, &(a, b, seen)) in truth {
        if seen.floor() < cutoff {
            continue;
        }
        let d = haversine_m(lat, lng, a, b);
        if (d - radius).abs() <= 1.0 {
            edge.insert(key);
        } else if d <= radius {
            inside.insert(key);
        }
    }
    (inside, edge)
}

fn check(index: &LocationIndex, truth: &Truth, lat: f64, lng: f64, radius: f64, now: f64) {
    let got: Vec<DeviceKey> = index.within_keys(lat, lng, radius, now).unwrap();
    let set: BTreeSet<DeviceKey> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "duplicates at ({lat}, {lng}) r={radius}");
    let (inside, edge) = oracle(truth, lat, lng, radius, (now - f64::from(index.ttl_s())).ceil());
    let missing: Vec<_> = inside.difference(&set).collect();
    let extra: Vec<_> = set.difference(&inside).filter(|k| !edge.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "missing {} at ({lat}, {lng}) r={radius}: {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert!(
        extra.is_empty(),
        "extra {} at ({lat}, {lng}) r={radius}: {:?}",
        extra.len(),
        &extra[..extra.len().min(3)]
    );
}

fn cluster(rng: &mut StdRng, n: usize, lat: f64, lng: f64, spread: f64) -> Vec<(f64, f64)> {
    (0..n)
        .map(|_| {
            let a = (lat + rng.random_range(-spread..spread)).clamp(-90.0, 90.0);
            let mut b = lng + rng.random_range(-spread..spread) * 2.0;
            if b > 180.0 {
                b -= 360.0;
            }
            if b < -180.0 {
                b += 360.0;
            }
            (a, b)
        })
        .collect()
}

fn load(
    index: &LocationIndex,
    truth: &mut Truth,
    keys: &[DeviceKey],
    points: &[(f64, f64)],
    seen: f64,
) {
    for chunk in (0..keys.len()).collect::<Vec<_>>().chunks(20_000) {
        let ids: Vec<u64> = chunk.iter().map(|&i| keys[i].id).collect();
        let gws: Vec<u16> = chunk.iter().map(|&i| keys[i].gateway).collect();
        let lat: Vec<f64> = chunk.iter().map(|&i| points[i].0).collect();
        let lng: Vec<f64> = chunk.iter().map(|&i| points[i].1).collect();
        let seens = vec![seen; chunk.len()];
        index.upsert(&ids, &gws, &lat, &lng, &seens, NOW).unwrap();
        for &i in chunk {
            truth.insert(keys[i], (points[i].0, points[i].1, seen));
        }
    }
}

#[test]
fn random_places_moves_removals_and_expiry_match_the_oracle() {
    let mut rng = StdRng::seed_from_u64(11);
    let index = LocationIndex::new(10, 1800).unwrap();
    let mut truth = Truth::new();
    let places = [
        (39.9042, 116.4074),
        (89.999, 0.0),
        (-89.9, 45.0),
        (0.0, 179.999),
        (-33.9, 151.2),
        (0.0, 0.0),
    ];
    let mut keys = Vec::new();
    let mut points = Vec::new();
    for (k, &(lat, lng)) in places.iter().enumerate() {
        for p in cluster(&mut rng, 30_000, lat, lng, 0.05 + 0.3 * (k % 2) as f64) {
            keys.push(DeviceKey {
                gateway: rng.random_range(0..3),
                id: rng.random_range(0..200_000),
            });
            points.push(p);
        }
    }
    // Many devices on one spot.
    for i in 0..500u64 {
        keys.push(DeviceKey { gateway: 5, id: 1_000_000 + i });
        points.push((31.2304, 121.4737));
    }
    load(&index, &mut truth, &keys, &points, NOW - 10.0);
    assert_eq!(index.live(NOW).unwrap(), truth.len());

    let radii = [0.0, 5.0, 150.0, 1000.0, 3000.0, 10_000.0, 100_000.0, 500_000.0];
    for &(lat, lng) in places.iter().chain(&[(31.2304, 121.4737), (0.0, -179.999), (90.0, 0.0)]) {
        for &r in &radii {
            check(&index, &truth, lat, lng, r, NOW);
        }
    }

    // Move a third of the devices, some far, some a few metres.
    let movers: Vec<usize> = (0..keys.len()).filter(|i| i % 3 == 0).collect();
    let moved: Vec<(f64, f64)> = movers
        .iter()
        .map(|&i| {
            if i % 2 == 0 {
                ((points[i].0 + rng.random_range(-0.0005..0.0005)).clamp(-90.0, 90.0), points[i].1)
            } else {
                points[rng.random_range(0..points.len())]
            }
        })
        .collect();
    let mk: Vec<DeviceKey> = movers.iter().map(|&i| keys[i]).collect();
    load(&index, &mut truth, &mk, &moved, NOW - 5.0);
    // Removals, with and without the gateway.
    let gone: Vec<DeviceKey> = keys.iter().step_by(7).copied().collect();
    let ids: Vec<u64> = gone.iter().map(|k| k.id).collect();
    let gws: Vec<u16> = gone.iter().map(|k| k.gateway).collect();
    index.remove(&ids, Some(&gws)).unwrap();
    for k in &gone {
        truth.remove(k);
    }
    let removed = index.remove(&[1_000_001], None).unwrap();
    assert_eq!(removed, 1);
    truth.remove(&DeviceKey { gateway: 5, id: 1_000_001 });
    assert_eq!(index.live(NOW).unwrap(), truth.len());
    for &(lat, lng) in &places {
        for &r in &radii {
            check(&index, &truth, lat, lng, r, NOW);
        }
    }
    index.compact();
    for &(lat, lng) in &places[..3] {
        check(&index, &truth, lat, lng, 2000.0, NOW);
    }

    // Expiry: the first load was seen at NOW - 10, the moves at NOW - 5.
    let later = NOW - 8.0 + 1800.0;
    truth.retain(|_, v| v.2.floor() >= (later - 1800.0).ceil());
    for &(lat, lng) in &places {
        check(&index, &truth, lat, lng, 50_000.0, later);
    }
    assert_eq!(index.live(later).unwrap(), truth.len());
}

#[test]
fn stale_reports_are_ignored_and_the_newest_in_a_batch_wins() {
    let index = LocationIndex::new(10, 1800).unwrap();
    index.upsert(&[1], &[0], &[10.0], &[10.0], &[NOW - 1.0], NOW).unwrap();
    let out = index.upsert(&[1], &[0], &[20.0], &[20.0], &[NOW - 100.0], NOW).unwrap();
    assert_eq!(out.stale, 1);
    assert_eq!(index.within(10.0, 10.0, 1.0, NOW).unwrap(), vec![1]);
    index
        .upsert(
            &[1, 1, 1],
            &[0],
            &[30.0, 40.0, 50.0],
            &[30.0, 40.0, 50.0],
            &[NOW, NOW, NOW - 2.0],
            NOW,
        )
        .unwrap();
    assert_eq!(index.within(40.0, 40.0, 1.0, NOW).unwrap(), vec![1]);
    assert!(index.within(10.0, 10.0, 1.0, NOW).unwrap().is_empty());
    assert_eq!(index.live(NOW).unwrap(), 1);
}

#[test]
fn same_id_on_two_gateways_is_two_devices() {
    let index = LocationIndex::new(10, 1800).unwrap();
    index.upsert(&[7, 7], &[1, 2], &[1.0, 1.0], &[1.0, 1.0], &[NOW, NOW], NOW).unwrap();
    assert_eq!(index.live(NOW).unwrap(), 2);
    index.upsert(&[7], &[2], &[5.0], &[5.0], &[NOW], NOW).unwrap();
    assert_eq!(index.within(1.0, 1.0, 10.0, NOW).unwrap(), vec![7]);
    assert_eq!(index.remove(&[7], None).unwrap(), 2);
    assert_eq!(index.live(NOW).unwrap(), 0);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let index = LocationIndex::new(10, 1800).unwrap();
    let err = index
        .upsert(&[1, 2, 3], &[0], &[1.0, f64::NAN, 91.0], &[0.0; 3], &[NOW; 3], NOW)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "lat: 2 value(s) are not finite degrees within [-90, 90] (first at position 1: NaN)"
    );
    assert!(index.upsert(&[1, 2], &[0], &[1.0], &[0.0; 2], &[NOW; 2], NOW).is_err());
    assert!(index.upsert(&[1], &[0], &[1.0], &[0.0], &[NOW + 1000.0], NOW).is_err());
    assert_eq!(index.live(NOW).unwrap(), 0);
    assert!(index.within(0.0, 0.0, -1.0, NOW).is_err());
    assert!(index.within(0.0, 200.0, 1.0, NOW).is_err());
}

#[test]
fn new_recipients_never_repeat_a_device() {
    let mut rng = StdRng::seed_from_u64(3);
    let index = LocationIndex::new(10, 1800).unwrap();
    let mut truth = Truth::new();
    let points = cluster(&mut rng, 50_000, 30.0, 120.0, 0.05);
    let keys: Vec<DeviceKey> =
        (0..points.len() as u64).map(|id| DeviceKey { gateway: (id % 3) as u16, id }).collect();
    load(&index, &mut truth, &keys, &points, NOW);
    let record = AlertRecord::new();
    let mut all = BTreeSet::new();
    for (r, centres) in [
        (1000.0, vec![(30.0, 120.0)]),
        (2000.0, vec![(30.0, 120.0), (30.01, 120.01)]),
        (3000.0, vec![(30.0, 120.0)]),
    ] {
        let batch = index.new_recipients(&record, &centres, r, NOW).unwrap();
        for (&g, ids) in &batch {
            for &id in ids {
                assert!(all.insert(DeviceKey { gateway: g, id }), "notified twice");
            }
        }
        // Everything inside is now notified.
        for &(lat, lng) in &centres {
            let (inside, _) = oracle(&truth, lat, lng, r, 0.0);
            assert!(inside.iter().all(|k| record.contains(k.gateway, k.id)));
        }
    }
    assert_eq!(record.len(), all.len());
}

#[test]
fn large_batches_with_repeats_keep_the_newest_report() {
    let index = LocationIndex::new(10, 1800).unwrap();
    let n = 40_000usize;
    let ids: Vec<u64> = (0..n as u64).collect();
    index.upsert(&ids, &[0], &vec![10.0; n], &vec![10.0; n], &vec![NOW - 100.0; n], NOW).unwrap();
    // Everyone moves a metre, and every tenth device is reported a second time, later
    // in the batch, from far away but with an older time: that report must lose.
    let (mut batch_ids, mut lat, mut lng, mut seen) =
        (ids.clone(), vec![10.00001; n], vec![10.0; n], vec![NOW - 10.0; n]);
    for id in (0..n as u64).step_by(10) {
        batch_ids.push(id);
        lat.push(20.0);
        lng.push(20.0);
        seen.push(NOW - 50.0);
    }
    let out = index.upsert(&batch_ids, &[0], &lat, &lng, &seen, NOW).unwrap();
    assert_eq!((out.added, out.updated, out.stale), (0, n, n / 10));
    assert!(index.within(20.0, 20.0, 1000.0, NOW).unwrap().is_empty());
    assert_eq!(index.within(10.00001, 10.0, 1.0, NOW).unwrap().len(), n);
    assert_eq!(index.live(NOW).unwrap(), n);
}

#[test]
fn in_a_large_batch_the_later_of_two_equal_times_wins() {
    let index = LocationIndex::new(10, 1800).unwrap();
    let n = 40_000usize;
    let ids: Vec<u64> = (0..n as u64).collect();
    index.upsert(&ids, &[0], &vec![10.0; n], &vec![10.0; n], &vec![NOW - 100.0; n], NOW).unwrap();
    // Each device first jumps far away, then (same time, later in the batch) reports a
    // metre from where it was: the second report is the one that counts.
    let batch_ids: Vec<u64> = ids.iter().chain(&ids).copied().collect();
    let lat: Vec<f64> = [vec![20.0; n], vec![10.00001; n]].concat();
    let lng: Vec<f64> = [vec![20.0; n], vec![10.0; n]].concat();
    index.upsert(&batch_ids, &[0], &lat, &lng, &vec![NOW - 10.0; 2 * n], NOW).unwrap();
    assert!(index.within(20.0, 20.0, 1000.0, NOW).unwrap().is_empty());
    assert_eq!(index.within(10.00001, 10.0, 1.0, NOW).unwrap().len(), n);
}

#[test]
fn a_first_large_load_keeps_the_newest_report_of_each_device() {
    let index = LocationIndex::new(10, 1800).unwrap();
    let n = 30_000usize;
    // Device i is reported at (10, 10) and, later in the batch, at (20, 20) with the same
    // time (the later wins) for even i, and an older time (the earlier wins) for odd i.
    let ids: Vec<u64> = (0..n as u64).chain(0..n as u64).collect();
    let lat: Vec<f64> = [vec![10.0; n], vec![20.0; n]].concat();
    let seen: Vec<f64> =
        (0..2 * n).map(|k| if k >= n && k % 2 == 1 { NOW - 20.0 } else { NOW - 10.0 }).collect();
    let out = index.upsert(&ids, &[3], &lat, &lat, &seen, NOW).unwrap();
    assert_eq!((out.added, out.updated, out.stale), (n, 0, n));
    let mut far = index.within(20.0, 20.0, 10.0, NOW).unwrap();
    let mut near = index.within(10.0, 10.0, 10.0, NOW).unwrap();
    far.sort_unstable();
    near.sort_unstable();
    assert_eq!(far, (0..n as u64).step_by(2).collect::<Vec<_>>());
    assert_eq!(near, (1..n as u64).step_by(2).collect::<Vec<_>>());
    assert_eq!(index.live(NOW).unwrap(), n);
}

#[test]
fn answers_large_enough_to_scan_on_every_core_are_whole() {
    let mut rng = StdRng::seed_from_u64(5);
    let index = LocationIndex::new(10, 1800).unwrap();
    let mut truth = Truth::new();
    let points = cluster(&mut rng, 400_000, -23.5, -46.6, 0.3);
    let keys: Vec<DeviceKey> =
        (0..points.len() as u64).map(|id| DeviceKey { gateway: (id % 2) as u16, id }).collect();
    load(&index, &mut truth, &keys, &points, NOW);
    for radius in [20_000.0, 35_000.0, 2.0e7] {
        check(&index, &truth, -23.5, -46.6, radius, NOW);
    }
}

#[test]
fn a_large_ring_is_recorded_once_on_every_core() {
    // 300,000 devices on three gateways in one spot, some ids shared by two gateways:
    // large enough for the record's parallel path.
    let n = 300_000u64;
    let ids: Vec<u64> = (0..n).map(|i| i % 250_000).collect();
    let gateways: Vec<u16> = (0..n).map(|i| 1 + (i % 3) as u16).collect();
    let lat: Vec<f64> = (0..n).map(|i| 30.0 + (i % 1000) as f64 * 1e-5).collect();
    let lng: Vec<f64> = (0..n).map(|i| 110.0 + (i / 1000) as f64 * 1e-5).collect();
    let seen = vec![1_000.0; n as usize];
    let index = LocationIndex::new(10, 3600).unwrap();
    index.upsert(&ids, &gateways, &lat, &lng, &seen, 1_000.0).unwrap();
    let keys: BTreeSet<(u16, u64)> = ids.iter().zip(&gateways).map(|(&i, &g)| (g, i)).collect();

    let record = AlertRecord::new();
    let first = index.new_recipients(&record, &[(30.005, 110.0015)], 5_000.0, 1_000.0).unwrap();
    let mut got: Vec<(u16, u64)> =
        first.iter().flat_map(|(&g, ids)| ids.iter().map(move |&i| (g, i))).collect();
    got.sort_unstable();
    assert_eq!(got, keys.iter().copied().collect::<Vec<_>>(), "everyone, once");
    assert_eq!(record.len(), keys.len());
    for gateway in 1..=3u16 {
        let want: Vec<u64> = keys.iter().filter(|k| k.0 == gateway).map(|k| k.1).collect();
        assert_eq!(record.ids(gateway), want);
    }
    let again = index.new_recipients(&record, &[(30.005, 110.0015)], 5_000.0, 1_000.0).unwrap();
    assert!(again.values().all(Vec::is_empty), "nobody twice");
    assert_eq!(record.add(1, &[0, 3, 999_999_999]), 1);
    assert!(record.contains(1, 999_999_999) && !record.contains(2, 999_999_999));
}
