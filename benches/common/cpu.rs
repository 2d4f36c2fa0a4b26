//! The process's CPU time, shared by the benchmarks that report it.

/// CPU seconds this process has used so far (user + system, all threads;
/// `/proc/self/stat` counts in USER_HZ = 100 ticks per second).
#[allow(dead_code)]
pub fn cpu_secs() -> f64 {
    pid_cpu_secs(std::process::id())
}

/// CPU seconds process `pid` has used so far (user + system, all threads;
/// `/proc/<pid>/stat` counts in USER_HZ = 100 ticks per second; the fields
/// after the command name: state is field 3, utime 14, stime 15).
#[allow(dead_code)]
pub fn pid_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// CPU seconds used so far by every `postgres` process on the machine
/// (backends, WAL writer, checkpointer...): what shipping costs the
/// database, read from `/proc/<pid>/stat` (the same user-HZ ticks).
#[allow(dead_code)]
pub fn postgres_cpu_secs() -> f64 {
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with("postgres") {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        total +=
            (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / 100.0;
    }
    total
}
