//! holdfast-bench
