//! Board runs.
