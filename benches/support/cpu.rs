//! CPU time of processes, for the benchmarks that count what a job costs: the broker's
//! process (found by its port) and any process's user + system time from `/proc`.

use std::process::Command;

/// The broker's process: `BROKER_PID`, else the one listening on port 5672 (from `ss`).
pub fn broker_pid() -> Option<u32> {
    if let Some(pid) = std::env::var("BROKER_PID")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return Some(pid);
    }
    let out = Command::new("ss")
        .args(["-ltnpH", "sport = :5672"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("pid=")? + 4;
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) a process has used so far, from /proc.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ: 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// Context switches (voluntary and not) of every thread of this process so far, from
/// `/proc/self/task/*/status`: each is a thread handing the CPU on, the main cost of
/// passing a small job between threads.
pub fn own_context_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}
