//! The `producer` binary: parse the command line and hand it to the library, which
//! loads settings, runs the command and turns its result into an exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    producer::main_with(producer::cli::Cli::parse())
}
