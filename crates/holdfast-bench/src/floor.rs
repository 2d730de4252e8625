//! The loopback floor: how long one round trip between two threads over loopback TCP takes on
//! this machine, measured in the same run as the systems.
//!
//! W2's handoff gap runs from the previous holder's release call to the next grant at another
//! client: the release must reach the server and the grant must reach the waiter, two one-way
//! transits, which is one round trip. No lock service whose clients are other processes can
//! hand a lock over faster than this floor, so a bound below it (the issue's "≤ 0.1× Redis's
//! handoff p99") cannot be met by any of the systems on this machine. The floor is measured
//! with plain blocking threads and 64-byte messages, no runtime and no parsing: the cheapest
//! exchange there is.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::workload::{histogram, quantile_us, record};

/// Bytes each way per round trip (about a short lock request).
const MESSAGE_BYTES: usize = 64;

/// The loopback round trip, measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoopbackFloor {
    /// Round trips measured.
    pub round_trips: u64,
    /// Bytes each way.
    pub message_bytes: usize,
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

/// Measure round trips for `duration` after `warmup`: an echo thread and a pinging thread on
/// one loopback TCP connection (`TCP_NODELAY` on both ends).
///
/// # Errors
/// If the socket cannot be opened or the exchange breaks.
pub fn measure(warmup: Duration, duration: Duration) -> anyhow::Result<LoopbackFloor> {
    let listener = TcpListener::bind("127.0.0.1:0").context("loopback floor: bind")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::Builder::new()
        .name("loopback-echo".to_owned())
        .spawn(move || -> std::io::Result<()> {
            let (mut stream, _) = listener.accept()?;
            stream.set_nodelay(true)?;
            let mut buf = [0u8; MESSAGE_BYTES];
            loop {
                match stream.read_exact(&mut buf) {
                    Ok(()) => stream.write_all(&buf)?,
                    // The pinging side closed: done.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })
        .context("loopback floor: echo thread")?;
    let mut stream = TcpStream::connect(addr).context("loopback floor: connect")?;
    stream.set_nodelay(true)?;
    let message = [0x5au8; MESSAGE_BYTES];
    let mut answer = [0u8; MESSAGE_BYTES];
    let mut hist = histogram();
    let start = Instant::now();
    let end = start + warmup + duration;
    let measure_from = start + warmup;
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        stream.write_all(&message).context("loopback floor: send")?;
        stream
            .read_exact(&mut answer)
            .context("loopback floor: receive")?;
        if sent >= measure_from {
            record(&mut hist, sent.elapsed());
        }
    }
    drop(stream);
    echo.join()
        .map_err(|_| anyhow::anyhow!("loopback floor: echo thread panicked"))?
        .context("loopback floor: echo")?;
    anyhow::ensure!(!hist.is_empty(), "loopback floor: no round trip measured");
    Ok(LoopbackFloor {
        round_trips: hist.len(),
        message_bytes: MESSAGE_BYTES,
        p50_us: quantile_us(&hist, 0.5),
        p99_us: quantile_us(&hist, 0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_measures_round_trips_and_its_median_is_below_its_p99() {
        let floor = measure(Duration::from_millis(20), Duration::from_millis(100)).unwrap();
        assert!(floor.round_trips > 0);
        assert_eq!(floor.message_bytes, MESSAGE_BYTES);
        assert!(floor.p50_us > 0.0);
        assert!(floor.p50_us <= floor.p99_us);
    }
}
