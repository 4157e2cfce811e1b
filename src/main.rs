//! The `millrace` binary. The commands live in [`cli`], each a thin layer over the
//! `millrace` library; this file only runs them.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
