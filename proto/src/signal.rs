//! Signal names that supervisord 4.2 accepts for `stopsignal` and `signalProcess`.

/// (name without the `SIG` prefix, Linux number). supervisord resolves names through Python's
/// `signal` module, so these are the Linux names; realtime signals are left out on purpose.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// Normalises `TERM`, `term`, `SIGTERM` or `15` to the canonical name (`TERM`).
///
/// Returns `None` for anything supervisord would not resolve to one of [`SIGNALS`].
pub fn canonical(value: &str) -> Option<&'static str> {
    if let Ok(n) = value.parse::<i32>() {
        return SIGNALS.iter().find(|(_, num)| *num == n).map(|(name, _)| *name);
    }
    let upper = value.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS.iter().find(|(name, _)| *name == bare).map(|(name, _)| *name)
}

/// The Linux number of a canonical or accepted signal name.
pub fn number(value: &str) -> Option<i32> {
    let name = canonical(value)?;
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, num)| *num)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spellings_supervisord_accepts() {
        for s in ["TERM", "term", "SIGTERM", "sigterm", "15"] {
            assert_eq!(canonical(s), Some("TERM"), "{s}");
        }
        assert_eq!(number("hup"), Some(1));
    }

    #[test]
    fn refuses_unknown_signals() {
        for s in ["SIGNOPE", "", "SIG", "0", "65", " TERM", "TERM "] {
            assert_eq!(canonical(s), None, "{s:?}");
        }
    }
}
