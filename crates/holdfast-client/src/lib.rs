//! holdfast-client
