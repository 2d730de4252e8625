//! # holdfast-server
//! (skeleton: the server implementation replaces this.)

/// Arguments of `holdfast serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOLDFAST_LISTEN", default_value = "127.0.0.1:7390")]
    pub listen: String,
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Placeholder.
    #[error("not implemented yet")]
    NotImplemented,
}

/// Run the server until SIGTERM / ctrl-c (builds its own tokio runtime).
pub fn serve_blocking(_args: ServeArgs) -> Result<(), ServeError> {
    Err(ServeError::NotImplemented)
}
