//! The `engine._core` extension module: conversion at the edge, the GIL released
//! around every call that touches more than a handful of devices.
//!
//! Arrays arrive as contiguous numpy arrays of the exact dtype (the `engine` package
//! converts them); values are checked here, in Rust, in the same pass as the work.

use crate::error::InputError;
use crate::{AlertRecord as CoreRecord, LocationIndex};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn value_error(err: InputError) -> PyErr {
    PyValueError::new_err(err.to_string())
}

fn slice<'a, T: numpy::Element>(name: &str, a: &'a PyReadonlyArray1<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous array")))
}

/// Latitudes and longitudes, in degrees.
type Coordinates<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

/// Devices notified for one alert, by gateway.
#[pyclass(module = "engine._core", name = "AlertRecord", frozen, subclass)]
struct PyAlertRecord(CoreRecord);

#[pymethods]
impl PyAlertRecord {
    #[new]
    fn new() -> Self {
        Self(CoreRecord::new())
    }

    fn __len__(&self) -> usize {
        self.0.len()
    }

    fn add(&self, py: Python<'_>, gateway: u16, ids: PyReadonlyArray1<'_, u64>) -> PyResult<usize> {
        let ids = slice("device_id", &ids)?;
        Ok(py.detach(|| self.0.add(gateway, ids)))
    }

    fn add_new<'py>(
        &self,
        py: Python<'py>,
        gateway: u16,
        ids: PyReadonlyArray1<'_, u64>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let ids = slice("device_id", &ids)?;
        Ok(py.detach(|| self.0.add_new(gateway, ids)).into_pyarray(py))
    }

    fn contains(&self, gateway: u16, id: u64) -> bool {
        self.0.contains(gateway, id)
    }

    fn ids<'py>(&self, py: Python<'py>, gateway: u16) -> Bound<'py, PyArray1<u64>> {
        py.detach(|| self.0.ids(gateway)).into_pyarray(py)
    }

    fn gateways(&self) -> Vec<u16> {
        self.0.gateways()
    }
}

/// The live location index (see `engine.LocationIndex` for the documented API).
#[pyclass(module = "engine._core", name = "Index", frozen)]
struct PyIndex(LocationIndex);

#[pymethods]
impl PyIndex {
    #[new]
    fn new(resolution: u8, ttl_s: u32) -> PyResult<Self> {
        LocationIndex::new(resolution, ttl_s).map(Self).map_err(value_error)
    }

    #[getter]
    fn resolution(&self) -> u8 {
        self.0.resolution()
    }

    #[getter]
    fn ttl_s(&self) -> u32 {
        self.0.ttl_s()
    }

    /// Returns (added, updated, stale).
    #[allow(clippy::too_many_arguments)]
    fn upsert(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, u64>,
        gateways: PyReadonlyArray1<'_, u16>,
        lat: PyReadonlyArray1<'_, f64>,
        lng: PyReadonlyArray1<'_, f64>,
        seen: PyReadonlyArray1<'_, f64>,
        now: f64,
    ) -> PyResult<(usize, usize, usize)> {
        let (ids, gateways) = (slice("device_id", &ids)?, slice("gateway", &gateways)?);
        let (lat, lng, seen) = (slice("lat", &lat)?, slice("lng", &lng)?, slice("seen_at", &seen)?);
        let out =
            py.detach(|| self.0.upsert(ids, gateways, lat, lng, seen, now)).map_err(value_error)?;
        Ok((out.added, out.updated, out.stale))
    }

    #[pyo3(signature = (ids, gateways=None))]
    fn remove(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, u64>,
        gateways: Option<PyReadonlyArray1<'_, u16>>,
    ) -> PyResult<usize> {
        let ids = slice("device_id", &ids)?;
        let gateways = gateways.as_ref().map(|g| slice("gateway", g)).transpose()?;
        py.detach(|| self.0.remove(ids, gateways)).map_err(value_error)
    }

    fn within<'py>(
        &self,
        py: Python<'py>,
        lat: f64,
        lng: f64,
        radius_m: f64,
        now: f64,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let ids = py.detach(|| self.0.within(lat, lng, radius_m, now)).map_err(value_error)?;
        Ok(ids.into_pyarray(py))
    }

    /// Returns (gateways, ids) of the devices inside, as two arrays.
    #[allow(clippy::type_complexity)]
    fn within_keys<'py>(
        &self,
        py: Python<'py>,
        lat: f64,
        lng: f64,
        radius_m: f64,
        now: f64,
    ) -> PyResult<(Bound<'py, PyArray1<u16>>, Bound<'py, PyArray1<u64>>)> {
        let keys =
            py.detach(|| self.0.within_keys(lat, lng, radius_m, now)).map_err(value_error)?;
        let gateways: Vec<u16> = keys.iter().map(|k| k.gateway).collect();
        let ids: Vec<u64> = keys.iter().map(|k| k.id).collect();
        Ok((gateways.into_pyarray(py), ids.into_pyarray(py)))
    }

    fn new_recipients<'py>(
        &self,
        py: Python<'py>,
        record: &PyAlertRecord,
        lat: PyReadonlyArray1<'_, f64>,
        lng: PyReadonlyArray1<'_, f64>,
        radius_m: f64,
        now: f64,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (lat, lng) = (slice("lat", &lat)?, slice("lng", &lng)?);
        if lat.len() != lng.len() {
            return Err(value_error(InputError::Length {
                name: "lng",
                got: lng.len(),
                expected: lat.len(),
            }));
        }
        let centres: Vec<(f64, f64)> = lat.iter().copied().zip(lng.iter().copied()).collect();
        let by_gateway = py
            .detach(|| self.0.new_recipients(&record.0, &centres, radius_m, now))
            .map_err(value_error)?;
        let out = PyDict::new(py);
        for (gateway, ids) in by_gateway {
            out.set_item(gateway, ids.into_pyarray(py))?;
        }
        Ok(out)
    }

    fn positions<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'_, u64>,
        gateways: PyReadonlyArray1<'_, u16>,
        now: f64,
    ) -> PyResult<Coordinates<'py>> {
        let (ids, gateways) = (slice("device_id", &ids)?, slice("gateway", &gateways)?);
        let (lat, lng) = py.detach(|| self.0.positions(ids, gateways, now)).map_err(value_error)?;
        Ok((lat.into_pyarray(py), lng.into_pyarray(py)))
    }

    fn expire(&self, py: Python<'_>, now: f64) -> PyResult<usize> {
        py.detach(|| self.0.expire(now)).map_err(value_error)
    }

    fn live(&self, py: Python<'_>, now: f64) -> PyResult<usize> {
        py.detach(|| self.0.live(now)).map_err(value_error)
    }

    fn memory_bytes(&self) -> usize {
        self.0.memory_bytes()
    }

    fn compact(&self, py: Python<'_>) {
        py.detach(|| self.0.compact());
    }

    /// Returns (gateways, ids, lat, lng, seen) of every stored device.
    #[allow(clippy::type_complexity)]
    fn devices<'py>(
        &self,
        py: Python<'py>,
    ) -> (
        Bound<'py, PyArray1<u16>>,
        Bound<'py, PyArray1<u64>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<f64>>,
        Bound<'py, PyArray1<u32>>,
    ) {
        let (gateways, ids, lat, lng, seen) = py.detach(|| {
            let devices = self.0.devices();
            let gateways: Vec<u16> = devices.iter().map(|d| d.0.gateway).collect();
            let ids: Vec<u64> = devices.iter().map(|d| d.0.id).collect();
            let lat: Vec<f64> = devices.iter().map(|d| d.1).collect();
            let lng: Vec<f64> = devices.iter().map(|d| d.2).collect();
            let seen: Vec<u32> = devices.iter().map(|d| d.3).collect();
            (gateways, ids, lat, lng, seen)
        });
        (
            gateways.into_pyarray(py),
            ids.into_pyarray(py),
            lat.into_pyarray(py),
            lng.into_pyarray(py),
            seen.into_pyarray(py),
        )
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIndex>()?;
    m.add_class::<PyAlertRecord>()?;
    m.add("EARTH_RADIUS_M", crate::EARTH_RADIUS_M)?;
    Ok(())
}
