//! `holdfast __exec --parent-pid P -- COMMAND ARGS...` (hidden): how `run` starts its command
//! without a shell and without ever orphaning it. On Linux this process first asks the kernel
//! to SIGKILL it when its parent (the `run` process) dies (`PR_SET_PDEATHSIG`, preserved
//! across exec), checks the parent is still the one that started it, then replaces itself
//! with COMMAND (same pid, so `run` signals and waits for the command itself). No `unsafe`
//! `pre_exec` hook is needed.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;

use crate::exit;

/// Arguments of the hidden `__exec` subcommand.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The pid of the `run` process that must stay our parent.
    #[arg(long)]
    pub parent_pid: i32,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

/// Become the command; returns only if it cannot be executed (126/127, shell convention).
pub fn exec(args: &ExecArgs) -> u8 {
    #[cfg(target_os = "linux")]
    {
        if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
            eprintln!(
                "holdfast run: cannot set the parent-death signal ({e}); the command may outlive holdfast"
            );
        }
        // The parent died between our fork and the prctl: do not run unprotected.
        if nix::unistd::getppid().as_raw() != args.parent_pid {
            eprintln!("holdfast run: the runner exited before the command started; not running it");
            return exit::LOST;
        }
    }
    let Some((program, rest)) = args.command.split_first() else {
        return exit::USAGE;
    };
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!(
        "holdfast run: cannot execute {}: {err}",
        program.to_string_lossy()
    );
    if err.kind() == std::io::ErrorKind::NotFound {
        exit::NOT_FOUND
    } else {
        exit::CANNOT_EXECUTE
    }
}
