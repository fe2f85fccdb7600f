//! The few facts about other processes the agent reads from the kernel, and the signal it
//! sends to an orphan's process group. No decisions here (see `plan::plan_reaping`).

use std::collections::{BTreeMap, BTreeSet};

/// Start time (Unix seconds) of each of `pids` that is alive.
pub fn start_times(pids: &BTreeSet<i64>) -> BTreeMap<i64, i64> {
    if pids.is_empty() {
        return BTreeMap::new();
    }
    let Some(boot) = boot_time() else {
        return BTreeMap::new();
    };
    let ticks = rustix::param::clock_ticks_per_second().max(1) as i64;
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((*pid, boot + started_ticks(&stat)? / ticks))
        })
        .collect()
}

/// Field 22 of `/proc/PID/stat` (clock ticks after boot). The command name, field 2, is in
/// parentheses and may hold spaces and parentheses: the fields that follow start after the
/// last ')'.
fn started_ticks(stat: &str) -> Option<i64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3; field 22 is the 20th after it.
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn boot_time() -> Option<i64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// Sends `signal` to the process group `pid` leads (supervisord makes each child a group
/// leader, so the program's own children go too), or to `pid` alone if it leads none.
///
/// # Errors
/// The kernel's refusal.
pub fn signal_group(pid: i64, signal: rustix::process::Signal) -> std::io::Result<()> {
    let raw = i32::try_from(pid).map_err(std::io::Error::other)?;
    let pid = rustix::process::Pid::from_raw(raw).ok_or_else(|| std::io::Error::other("pid 0"))?;
    match rustix::process::kill_process_group(pid, signal) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => rustix::process::kill_process(pid, signal).map_err(Into::into),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_start_time_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 1000 10 18446744073709551615";
        assert_eq!(started_ticks(stat), Some(12345));
        let own = start_times(&BTreeSet::from([i64::from(std::process::id())]));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mine = own.values().next().copied().unwrap_or_default();
        assert!(mine <= now + 1 && mine > now - 3600, "{own:?} vs {now}");
    }
}
