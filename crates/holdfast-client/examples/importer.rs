//! Seed 000 in Rust: a code importer that takes `vocab_import/<CODE_TYPE>` before importing,
//! retries with exponential backoff and full jitter while another import holds it, and stops
//! if the lock is lost.
//!
//! ```sh
//! holdfast serve --durability memory &
//! cargo run -p holdfast-client --example importer -- RXNORM
//! ```

use std::time::Duration;

use holdfast_client::{Client, ClientError, Phase, RetryPolicy};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let code_type = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "RXNORM".to_owned());
    let url = std::env::var("HOLDFAST_URL")
        .unwrap_or_else(|_| holdfast_client::SERVER_URL_DEFAULT.to_owned());
    let client = Client::builder()
        .base_url(url)
        .request_timeout(Duration::from_secs(10))
        .build()?;
    let key = format!("vocab_import/{code_type}");
    let guard = client
        .lock(&key)
        .ttl(Duration::from_secs(30))
        .reason(format!("importing {code_type}"))
        // 10 attempts, 30 s doubling, full jitter, at most 5 min between attempts.
        .retry(RetryPolicy::default())
        .on_progress(|p| {
            if let Phase::Sleeping { next_retry_in } = p.phase {
                let holder = p.holders.first().map_or("someone", |h| h.holder.as_str());
                eprintln!(
                    "{} is held by {holder}; attempt {}/{} failed, retrying in {:.0?}",
                    p.key, p.attempt, p.attempts, next_retry_in
                );
            }
        })
        .acquire()
        .await?;
    eprintln!(
        "importing {code_type} with fencing token {}",
        guard.fencing_token()
    );
    tokio::select! {
        reason = guard.lost() => {
            eprintln!("lock lost ({reason}): stopping the import");
            return Err(ClientError::Lost(reason));
        }
        () = tokio::time::sleep(Duration::from_secs(5)) => eprintln!("import done"),
    }
    guard.release().await
}
