//! Writing to stdout. `println!` panics when stdout is a pipe its reader closed (`corral get
//! programs | head -1`); these end the program quietly instead, as Unix tools do.

/// Ends the program quietly if `r` says stdout's reader is gone.
pub fn written(r: std::io::Result<()>) {
    if let Err(e) = r
        && e.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(0);
    }
}

/// `print!` to stdout, quiet on a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::output::written(write!(std::io::stdout(), $($arg)*));
    }};
}

/// `println!` to stdout, quiet on a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        $crate::output::written(writeln!(std::io::stdout(), $($arg)*));
    }};
}
