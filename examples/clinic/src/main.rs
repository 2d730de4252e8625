//! clinic: the reference application (skeleton).
fn main() {}
