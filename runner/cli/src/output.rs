//! Standard output for every command: `out!` and `outln!` write to it, and a closed pipe
//! (`xlab query | head`) ends the program quietly.

/// Writes to standard output; a closed pipe (`xlab query | head`) ends the program quietly.
pub(crate) fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let r = o.write_fmt(args).and_then(|_| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(crate::common::exit::ENVIRONMENT.into());
    }
}

macro_rules! outln {
    ($($t:tt)*) => { $crate::output::emit(format_args!($($t)*), true) };
}

macro_rules! out {
    ($($t:tt)*) => { $crate::output::emit(format_args!($($t)*), false) };
}
