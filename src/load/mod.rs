//! load generator (stub)
