use clap::Parser;

fn main() {
    // Rust ignores SIGPIPE; a CLI piped into `head` should just stop, not panic.
    // SAFETY: SIG_DFL installs no handler, so no handler code has to be async-signal-safe;
    // this runs first in main, before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = warmstart::cli::Cli::parse_from(warmstart::cli::normalize_args(std::env::args_os()));
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARMSTART_LOG")
                // Other crates' (the HTTP client's) logging only from warnings.
                .unwrap_or_else(|_| {
                    format!(
                        "warn,warmstart={level},warmstart_snapshots={level},\
                         warmstart_launcher={level},warmstart_parasite={level}"
                    )
                    .into()
                }),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; plain text in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match warmstart::cli::main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("warmstart: {}", warmstart::report::error_line(&e));
            std::process::exit(1);
        }
    }
}
