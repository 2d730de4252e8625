//! The `holdfast` command: `serve` runs the lock server; the other subcommands are clients of
//! a running server (see `holdfast --help`).

use clap::{Parser, Subcommand};

/// holdfast: locks, leases and fencing tokens for business applications.
#[derive(Parser, Debug)]
#[command(name = "holdfast", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the lock server (embedded storage in ./holdfast-data, 127.0.0.1:7390, durability sync).
    Serve(holdfast_server::ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match holdfast_server::serve_blocking(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("holdfast serve: {err}");
                std::process::ExitCode::from(1)
            }
        },
    }
}
