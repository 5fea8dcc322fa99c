//! Prometheus metrics (to be written).
